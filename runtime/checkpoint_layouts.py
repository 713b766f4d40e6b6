"""Aria checkpoint layouts and the one rename table between them and our canonical names.

Layouts (ARIA_SPEC §3):
- "a"  original remote code: `vision_tower.vision_model.*`, projector `ln_kv` / `ln_ffn` / `ffn`;
- "b"  Aria-sequential_mlp: as "a" but routed experts as per-expert linears
       `...mlp.experts.experts.{e}.{gate,up,down}_proj.weight` (also read: `...mlp.experts.{e}.*`);
- "c1" hub main (transformers-native on the Hub): canonical names + a zero `vision_tower.post_layernorm`;
- "c2" transformers >= 4.52 save: `model.language_model.*`, `model.vision_tower.*`, `lm_head.*`;
- "c3" transformers v5 in-memory: c2 with experts `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`.

Canonical = c1 without `vision_tower.post_layernorm` (applying it would zero the image features,
pitfall P3). Every rule below is a pair of templates read both ways: `{L}`, `{l}` and `{e}` match
layer / vision layer / expert numbers and `{rest}` any tail. A layout key that renames to a
canonical name which does not rename back to the same key belongs to another layout and is
rejected, so a checkpoint mixing two layouts cannot slip through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from quant import get_scheme, scheme_names

from .errors import CheckpointError

LAYOUTS = ("a", "b", "c1", "c2", "c3")

# Every canonical weight name. Anything a layout renames to outside this list is an error.
CANONICAL_NAMES = [
    "vision_tower.embeddings.patch_embedding.{p}",
    "vision_tower.embeddings.position_embedding.weight",
    "vision_tower.encoder.layers.{l}.self_attn.{q_proj,k_proj,v_proj,out_proj}.{p}",
    "vision_tower.encoder.layers.{l}.{layer_norm1,layer_norm2}.{p}",
    "vision_tower.encoder.layers.{l}.mlp.{fc1,fc2}.{p}",
    "multi_modal_projector.query",
    "multi_modal_projector.cross_attn.{q_proj,k_proj,v_proj}.weight",
    "multi_modal_projector.cross_attn.multihead_attn.{in_proj_weight,in_proj_bias}",
    "multi_modal_projector.cross_attn.multihead_attn.out_proj.{p}",
    "multi_modal_projector.cross_attn.{linear,layer_norm,layer_norm_kv}.{p}",
    "multi_modal_projector.layer_norm.{p}",
    "multi_modal_projector.feed_forward.{linear_in,linear_out}.weight",
    "language_model.model.embed_tokens.weight",
    "language_model.model.norm.weight",
    "language_model.lm_head.weight",
    "language_model.model.layers.{L}.self_attn.{q_proj,k_proj,v_proj,o_proj}.weight",
    "language_model.model.layers.{L}.{input_layernorm,post_attention_layernorm}.weight",
    "language_model.model.layers.{L}.mlp.router.weight",
    "language_model.model.layers.{L}.mlp.shared_experts.{gate_proj,up_proj,down_proj}.weight",
    "language_model.model.layers.{L}.mlp.experts.{fc1,fc2}.weight",
]

_FC1 = "language_model.model.layers.{L}.mlp.experts.fc1.weight"
_FC2 = "language_model.model.layers.{L}.mlp.experts.fc2.weight"

# (canonical template, layout template), tried in order; the first whose side matches wins.
_ORIGINAL_RULES = [
    ("vision_tower.{rest}", "vision_tower.vision_model.{rest}"),
    ("multi_modal_projector.cross_attn.layer_norm_kv.{rest}", "multi_modal_projector.cross_attn.ln_kv.{rest}"),
    ("multi_modal_projector.layer_norm.{rest}", "multi_modal_projector.ln_ffn.{rest}"),
    ("multi_modal_projector.feed_forward.{rest}", "multi_modal_projector.ffn.{rest}"),
    ("multi_modal_projector.{rest}", "multi_modal_projector.{rest}"),
    ("language_model.{rest}", "language_model.{rest}"),
]
_HUB_RULES = [
    ("vision_tower.{rest}", "vision_tower.{rest}"),
    ("multi_modal_projector.{rest}", "multi_modal_projector.{rest}"),
    ("language_model.{rest}", "language_model.{rest}"),
]
_TRANSFORMERS_RULES = [
    ("vision_tower.{rest}", "model.vision_tower.{rest}"),
    ("multi_modal_projector.{rest}", "model.multi_modal_projector.{rest}"),
    ("language_model.lm_head.{rest}", "lm_head.{rest}"),
    ("language_model.model.{rest}", "model.language_model.{rest}"),
]
_V5_EXPERT_RULES = [
    (_FC1, "model.language_model.layers.{L}.mlp.experts.gate_up_proj"),
    (_FC2, "model.language_model.layers.{L}.mlp.experts.down_proj"),
]

# Layout b: a grouped canonical tensor [E, in, out] is, per expert e, the transposed per-expert
# linears ([out, in]) concatenated along `out` in this order (fc1 = gate | up, pitfall P14).
_SEQUENTIAL_EXPERTS = "language_model.model.layers.{L}.mlp.experts.experts.{e}."
_SEQUENTIAL_EXPERTS_ALT = "language_model.model.layers.{L}.mlp.experts.{e}."  # naming unconfirmed

# Keys that exist in some layouts and are ignored: rotary caches and the zero post-LN (P3).
_DROPPED = [r".*\.inv_freq", r"(model\.)?vision_tower\.(vision_model\.)?post_layernorm\.(weight|bias)"]


def _expand(template: str) -> list[str]:
    """'a.{x,y}.{p}' -> ['a.x.weight', 'a.x.bias', 'a.y.weight', 'a.y.bias']; holes like {L} stay."""
    template = template.replace("{p}", "{weight,bias}")
    m = re.search(r"\{(\w+(?:,\w+)+)\}", template)
    if not m:
        return [template]
    return [x for alt in m.group(1).split(",") for x in _expand(template[: m.start()] + alt + template[m.end():])]


class Template:
    """A key pattern with named holes, usable to match a key and to format one."""

    _HOLES: ClassVar[dict[str, str]] = {"L": r"\d+", "l": r"\d+", "e": r"\d+", "rest": r".+"}

    def __init__(self, text: str):
        self.text = text
        parts = re.split(r"\{(\w+)\}", text)
        regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{self._HOLES[p]})" for i, p in enumerate(parts))
        self._regex = re.compile(regex + r"\Z")

    def match(self, key: str) -> dict[str, str] | None:
        m = self._regex.match(key)
        return m.groupdict() if m else None

    def format(self, **holes: object) -> str:
        return self.text.format(**holes)


_CANONICAL = [Template(t) for template in CANONICAL_NAMES for t in _expand(template)]
_DROPPED_RE = re.compile("|".join(f"(?:{d})" for d in _DROPPED) + r"\Z")
# Quantized checkpoints (ours) store a weight `X.weight` as packed tensors `X.weight.<part>`.
_PACKED_PARTS = sorted({part for name in scheme_names() for part in get_scheme(name).suffixes})
_PACKED_RE = re.compile(r"(?<=\.weight)\.(" + "|".join(_PACKED_PARTS) + r")\Z")


def is_canonical(name: str) -> bool:
    base = _PACKED_RE.sub("", name)  # a quantized weight's packed parts share its name
    return any(t.match(base) is not None for t in _CANONICAL)


@dataclass(frozen=True)
class ExpertSplit:
    """A grouped canonical tensor stored as per-expert linears (layout b)."""

    canonical: Template  # e.g. ...mlp.experts.fc1.weight, holes {L}
    parts: tuple[Template, ...]  # e.g. (...experts.{e}.gate_proj.weight, ...up_proj...), holes {L}, {e}

    def join(self, per_part: list[list[torch.Tensor]], dtype: torch.dtype | None = None) -> torch.Tensor:
        """per_part[p][e] is a linear weight [out_p, in] -> grouped [E, in, sum(out_p)] as `dtype`.

        Filled expert by expert, so the result is the only allocation (no stack/cat copies).
        """
        widths = [weights[0].shape[0] for weights in per_part]
        first = per_part[0][0]
        out = torch.empty(len(per_part[0]), first.shape[1], sum(widths), dtype=dtype or first.dtype)
        offset = 0
        for weights, width in zip(per_part, widths):
            for e, weight in enumerate(weights):
                out[e, :, offset: offset + width].copy_(weight.t())
            offset += width
        return out

    def split(self, grouped: torch.Tensor) -> list[list[torch.Tensor]]:
        """Inverse of join: grouped [E, in, out] -> per_part[p][e] of [out / len(parts), in]."""
        chunks = grouped.chunk(len(self.parts), dim=2)
        return [[c[e].t().contiguous() for e in range(grouped.shape[0])] for c in chunks]


def _expert_splits(prefix: str) -> tuple[ExpertSplit, ...]:
    return (
        ExpertSplit(Template(_FC1), (Template(prefix + "gate_proj.weight"), Template(prefix + "up_proj.weight"))),
        ExpertSplit(Template(_FC2), (Template(prefix + "down_proj.weight"),)),
    )


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    rules: tuple[tuple[str, str], ...]
    # Readable per-expert namings; the first is the one written.
    expert_splits: tuple[tuple[ExpertSplit, ...], ...] = ()
    # Transformers-native checkpoints carry an all-zero, never-used vision post-LayerNorm
    # (pitfall P3) under this prefix; reading drops it, writing adds it back.
    zero_post_layernorm: str | None = None

    @cached_property
    def _compiled(self) -> list[tuple[Template, Template]]:
        return [(Template(c), Template(k)) for c, k in self.rules]

    def to_canonical(self, key: str) -> str | None:
        """Canonical name for a key of this layout; None for a key that is dropped on purpose.

        Raises CheckpointError for a key that does not belong to this layout. Per-expert keys of
        layout b are handled by `expert_part` instead.
        """
        if _DROPPED_RE.match(key):
            return None
        packed = _PACKED_RE.search(key)
        if packed is not None:
            base = self.to_canonical(key[: packed.start()])
            return None if base is None else base + packed.group(0)
        for canonical, stored in self._compiled:
            holes = stored.match(key)
            if holes is not None:
                name = canonical.format(**holes)
                if is_canonical(name) and self.from_canonical(name) == key:
                    return name
                break
        raise CheckpointError(f"unexpected weight '{key}' for a layout-{self.name} ({self.description}) checkpoint")

    def from_canonical(self, name: str) -> str:
        """The key this layout stores a (non-split) canonical tensor under."""
        for canonical, stored in self._compiled:
            holes = canonical.match(name)
            if holes is not None:
                return stored.format(**holes)
        raise KeyError(name)

    def expert_part(self, key: str) -> tuple[ExpertSplit, str, int, int] | None:
        """For a per-expert key: (split, canonical name, part index, expert index)."""
        for splits in self.expert_splits:
            for split in splits:
                for p, part in enumerate(split.parts):
                    holes = part.match(key)
                    if holes is not None:
                        return split, split.canonical.format(L=holes["L"]), p, int(holes["e"])
        return None

    def split_for(self, name: str) -> ExpertSplit | None:
        """The split that stores canonical `name` per expert when writing, if any."""
        if not self.expert_splits:
            return None
        return next((s for s in self.expert_splits[0] if s.canonical.match(name) is not None), None)


LAYOUT_TABLE: dict[str, Layout] = {
    "a": Layout("a", "original remote code", tuple(_ORIGINAL_RULES)),
    "b": Layout(
        "b", "Aria-sequential_mlp", tuple(_ORIGINAL_RULES),
        (_expert_splits(_SEQUENTIAL_EXPERTS), _expert_splits(_SEQUENTIAL_EXPERTS_ALT)),
    ),
    "c1": Layout("c1", "hub main", tuple(_HUB_RULES), zero_post_layernorm="vision_tower.post_layernorm"),
    "c2": Layout("c2", "transformers-saved", tuple(_TRANSFORMERS_RULES),
                 zero_post_layernorm="model.vision_tower.post_layernorm"),
    "c3": Layout("c3", "transformers v5", tuple(_V5_EXPERT_RULES + _TRANSFORMERS_RULES),
                 zero_post_layernorm="model.vision_tower.post_layernorm"),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUT_TABLE[name]
    except KeyError:
        raise ValueError(f"unknown checkpoint layout '{name}'; use one of {', '.join(LAYOUTS)}") from None


# Which layout a key set is in, decided by the first marker found (most specific first).
_MARKERS = [
    ("c3", re.compile(r"model\.language_model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)\Z")),
    ("c2", re.compile(r"(model\.(language_model|vision_tower|multi_modal_projector)\.|lm_head\.)")),
    ("b", re.compile(r"language_model\.model\.layers\.\d+\.mlp\.experts\.(experts\.)?\d+\.")),
    ("a", re.compile(r"(vision_tower\.vision_model\.|multi_modal_projector\.(ln_ffn|ffn|cross_attn\.ln_kv)\.)")),
]


def detect_layout(keys: list[str] | set[str], source: str = "checkpoint") -> str:
    """The layout of a checkpoint from its key names.

    Layouts a and c1 name the language model identically; without vision or projector keys
    (which decide it) c1 is reported, and reading is the same either way.
    """
    if not keys:
        raise CheckpointError(f"{source} contains no weights; download the model again")
    for layout, marker in _MARKERS:
        if any(marker.match(k) for k in keys):
            return layout
    if any(k.startswith(("language_model.", "vision_tower.", "multi_modal_projector.")) for k in keys):
        return "c1"
    example = min(keys)
    raise CheckpointError(f"{source} does not look like an Aria checkpoint (first weight: '{example}')")
