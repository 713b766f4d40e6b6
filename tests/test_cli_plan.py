"""`aria plan`: the planner's placement printed for the real Aria config without any download,
for a local model, and for a Hub model whose config.json alone is fetched (from a fake Hub).

The printed rows are compared with runtime.plan_table's rows for the planner's own plan (the
planner's arithmetic is tested in test_placement.py); facts from the design notes (int4 fits a
24 GB card whole, int8 and bf16 need offloading there) are checked on the printed table itself.
"""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
from typer.testing import CliRunner
from user_env import isolate_user_env

from aria_cli.main import app
from runtime.config import AriaConfig, load_config
from runtime.known_configs import aria_config_dict
from runtime.placement import Bandwidths, card_plans, plan_placement
from runtime.plan_table import PLAN_COLUMNS, SUMMARY_COLUMNS, plan_rows, summary_rows
from runtime.tiny_checkpoint import write_tiny_checkpoint
from tests.test_cli_download import FakeHub

ARIA = AriaConfig.from_dict(aria_config_dict())
GIB = 2**30


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    isolate_user_env(monkeypatch, tmp_path)
    return tmp_path


def plan(*args):
    return CliRunner().invoke(app, ["plan", *map(str, args)])


def rows(result) -> list[tuple[str, ...]]:
    assert result.exit_code == 0, result.stderr
    return [tuple(line.split("\t")) for line in result.stdout.splitlines()]


def expected(columns, body) -> list[tuple[str, ...]]:
    return [tuple(c.upper() for c in columns), *[tuple(r) for r in body]]


@pytest.mark.parametrize(("gib", "scheme"), [(24, "int4"), (24, "int8"), (16, "none")])
def test_real_aria_plans_without_any_download(gib, scheme):
    printed = rows(plan("--gpu-memory", f"{gib}GiB", "--quant", scheme, "--offline"))
    wanted = plan_placement(ARIA, gib * GIB, scheme=None if scheme == "none" else scheme)
    assert printed == expected(PLAN_COLUMNS, plan_rows(wanted))
    parts = [row[0] for row in printed]
    if scheme == "int4":  # 14.9 GB of weights: a 24 GB card holds every expert
        assert "routed experts, layers 0-27: all 64 resident" in parts
        assert ("total", "CPU memory", "0.0 GB") in printed
    else:  # int8 (26.3 GB) and bf16 (50.6 GB) do not fit whole: experts are cached from CPU memory
        assert any("cached in slots" in p for p in parts)
        assert any(row[1] == "CPU memory (pinned)" for row in printed)


def test_scheme_flag_is_the_same_as_quant_and_they_must_agree():
    assert rows(plan("--gpu-memory", "24GiB", "--scheme", "int8")) == rows(plan("--gpu-memory", "24GiB",
                                                                                  "--quant", "int8"))
    result = plan("--gpu-memory", "24GiB", "--scheme", "int8", "--quant", "int4")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == "error: --scheme int8 and --quant int4 disagree; give one of them\n"


def test_json_is_the_plan_as_data():
    result = plan("--gpu-memory", "24GiB", "--quant", "int8", "--json")
    assert result.exit_code == 0 and result.stdout.count("\n") == 1
    out = json.loads(result.stdout)
    wanted = json.loads(json.dumps(plan_placement(ARIA, 24 * GIB, scheme="int8").to_dict()))
    assert out == {"model": "aria", "config": "rhymes-ai/Aria, built-in config", **wanted}


def test_compile_plans_for_the_decode_graphs_too():
    result = plan("--gpu-memory", "24GiB", "--quant", "int4", "--compile", "--json")
    assert result.exit_code == 0
    wanted = json.loads(json.dumps(plan_placement(ARIA, 24 * GIB, scheme="int4", compiled=True).to_dict()))
    assert json.loads(result.stdout) == {"model": "aria", "config": "rhymes-ai/Aria, built-in config", **wanted}
    assert wanted["graph_bytes"] > 0


def test_impossible_budget_is_one_line_error():
    result = plan("--gpu-memory", "4GiB", "--quant", "int4")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: Aria needs at least ") and result.stderr.count("\n") == 1
    assert "but the budget is 4.3 GB" in result.stderr


def test_a_card_that_holds_the_model_at_no_scheme_points_to_vllm():
    result = plan("--gpu-memory", "3GiB")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "use a GPU with more memory, or several GPUs with vLLM: vllm serve rhymes-ai/Aria" in result.stderr


def test_placement_flags_and_bandwidths_reach_the_planner():
    printed = rows(plan("--gpu-memory", "24GiB", "--quant", "int4", "--n-cpu-moe", "4", "--expert-slots", "16",
                        "--max-context", "4096", "--pcie-bandwidth", "64", "--cpu-bandwidth", "80"))
    wanted = plan_placement(ARIA, 24 * GIB, scheme="int4", n_cpu_moe=4, expert_slots=16, context=4096,
                            bandwidth=Bandwidths(pcie=64, cpu=80))
    assert printed == expected(PLAN_COLUMNS, plan_rows(wanted))
    assert ("routed experts, layers 0-3: all 64, computed on the CPU", "CPU memory") == printed[4][:2]
    cpu_moe = rows(plan("--gpu-memory", "24GiB", "--quant", "int4", "--cpu-moe"))
    assert cpu_moe == expected(PLAN_COLUMNS, plan_rows(plan_placement(ARIA, 24 * GIB, scheme="int4", cpu_moe=True)))


def test_bad_placement_flags_are_usage_errors():
    result = plan("--gpu-memory", "24GiB", "--n-cpu-moe", "40")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == "error: --n-cpu-moe must be 0 to 28 (the model's layers), got 40\n"
    result = plan("--gpu-memory", "24GiB", "--pcie-bandwidth", "0")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == "error: --pcie-bandwidth must be a number of GB/s more than 0 (got 0)\n"
    for value in ("inf", "nan"):  # JSON (--json) has no Infinity
        result = plan("--gpu-memory", "24GiB", "--gpu-bandwidth", value, "--json")
        assert result.stderr == f"error: --gpu-bandwidth must be a number of GB/s more than 0 (got {value})\n"


def test_without_a_budget_it_summarises_common_cards():
    assert rows(plan("--device", "cpu")) == expected(SUMMARY_COLUMNS, summary_rows(card_plans(ARIA)))
    only_int4 = rows(plan("--device", "cpu", "--quant", "int4"))
    assert only_int4 == expected(SUMMARY_COLUMNS, summary_rows(card_plans(ARIA, schemes=("int4",))))
    assert {row[1] for row in only_int4[1:]} == {"int4"}


def test_quantized_aliases_plan_at_their_scheme_before_they_exist():
    assert rows(plan("-m", "aria-int8", "--gpu-memory", "24GiB")) == expected(
        PLAN_COLUMNS, plan_rows(plan_placement(ARIA, 24 * GIB, scheme="int8")))
    result = plan("-m", "aria-int8", "--gpu-memory", "24GiB", "--quant", "int4")
    assert result.exit_code == 2 and result.stderr == "error: this model is already quantized (int8); drop --quant int4\n"


def test_local_model_plans_from_its_own_config(tmp_path):
    tiny = write_tiny_checkpoint(tmp_path / "tiny", seed=1)
    printed = rows(plan("-m", tiny, "--gpu-memory", "1GiB"))
    assert printed == expected(PLAN_COLUMNS, plan_rows(plan_placement(load_config(tiny), GIB, context=1024)))


@pytest.fixture
def hub(env, monkeypatch):
    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    import huggingface_hub.constants as hf_constants

    # As in test_cli_download: huggingface_hub's import-time endpoint must not be the real Hub.
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    yield hub
    hub.stop()


def test_other_hub_model_fetches_only_its_config(hub):
    config = aria_config_dict()
    config["text_config"]["num_hidden_layers"] = 20  # a smaller Aria-shaped model
    hub.publish("someone/aria-small", {"config.json": json.dumps(config).encode(), "model.safetensors": b"x" * 64})
    printed = rows(plan("-m", "someone/aria-small", "--gpu-memory", "24GiB", "--quant", "int8"))
    assert printed == expected(PLAN_COLUMNS, plan_rows(plan_placement(AriaConfig.from_dict(config), 24 * GIB,
                                                                      scheme="int8")))
    assert hub.file_gets() == hub.file_gets("config.json") >= 1
    offline = plan("-m", "someone/other", "--gpu-memory", "24GiB", "--offline")
    assert offline.exit_code == 1
    assert offline.stderr == ("error: model someone/other is not downloaded; run `aria download someone/other` "
                              "(or drop --offline)\n")


def test_a_hub_repo_without_config_json_is_named_as_not_an_aria_model(hub):
    hub.publish("someone/no-config", {"model.safetensors": b"x" * 64})
    result = plan("-m", "someone/no-config", "--gpu-memory", "24GiB")
    assert result.exit_code == 1
    assert result.stderr == (f"error: someone/no-config has no config.json on {hub.url}: it is not an Aria model; "
                             "check the name\n")


def test_no_network_fails_at_once_in_one_line(monkeypatch):
    """As `aria download` and `aria ask` do: one lookup, no half minute of retries printed line by line."""
    with socket.socket() as probe:  # a port nothing listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)  # as the hub fixture above does
    waits = []  # huggingface_hub sleeps between its retries
    monkeypatch.setattr(time, "sleep", waits.append)
    result = plan("-m", "someone/elsewhere", "--gpu-memory", "24GiB")
    assert waits == []
    assert result.exit_code == 1 and result.stdout == ""
    assert re.fullmatch(rf"error: cannot reach {endpoint} to look up someone/elsewhere \((?:ConnectError|ConnectionError): [^\n]*\); "
                        r"check your connection, or use --offline for models already downloaded\n",
                        result.stderr), result.stderr
