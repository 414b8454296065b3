"""Label-aware flips and time reversal, declared by the data (``ROOT/augment.json``).

A horizontal flip turns "move left" into "move right"; playing a clip backwards turns
"grow" into "shrink". Which classes swap, which stay, and which must never be flipped or
reversed is a property of the label set, so the data declares it::

    {"hflip":   {"move_left": "move_right", "rotate_cw": "rotate_acw"},
     "reverse": {"grow": "shrink", "move_up": "move_down"},
     "no_hflip": ["write_letter"], "no_reverse": ["fall", "open_door"]}

Semantics (mmaction2's ``Flip(flip_label_map=...)`` for the flip, and the same rule for
reversal):

- no ``hflip`` map and no ``no_hflip`` list: clips are never flipped (likewise reversal);
- once declared, a clip of a mapped class is flipped with probability p and then carries
  its partner's label (maps are symmetric: ``a: b`` also means ``b: a``; ``a: a`` declares
  ``a`` unchanged by the flip); a class in ``no_hflip`` (direction-sensitive without a
  partner) is never flipped; any other class is flipped and keeps its label.

Bad declarations fail before training starts: an unknown class (the valid ones are
listed), a class mapped to two others, a class both mapped and listed as never
flipped, an unknown key.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

AUGMENT_FILE = "augment.json"
KINDS = ("hflip", "reverse")
_KEYS = ("hflip", "reverse", "no_hflip", "no_reverse")


@dataclass
class LabelMaps:
    """Declared class maps by class name (see the module docstring); ``resolve`` checks them."""

    hflip: dict[str, str] | None = None
    reverse: dict[str, str] | None = None
    no_hflip: list[str] = field(default_factory=list)
    no_reverse: list[str] = field(default_factory=list)

    def declared(self, kind: str) -> bool:
        """Whether ``kind`` ("hflip" / "reverse") was declared at all (a map or a never-list)."""
        return getattr(self, kind) is not None or bool(getattr(self, f"no_{kind}"))

    def merged(self, other: "LabelMaps") -> "LabelMaps":
        """These maps with every part that ``other`` declares replaced by ``other``'s."""
        out = LabelMaps(self.hflip, self.reverse, list(self.no_hflip), list(self.no_reverse))
        for kind in KINDS:
            if getattr(other, kind) is not None:
                setattr(out, kind, dict(getattr(other, kind)))
            if getattr(other, f"no_{kind}"):
                setattr(out, f"no_{kind}", list(getattr(other, f"no_{kind}")))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"hflip": self.hflip, "reverse": self.reverse, "no_hflip": self.no_hflip,
                "no_reverse": self.no_reverse}

    @classmethod
    def from_dict(cls, data: Any, source: str = "label maps") -> "LabelMaps":
        if not isinstance(data, Mapping):
            raise ValueError(f"{source} must be a JSON object with keys {list(_KEYS)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {list(_KEYS)}")
        maps: dict[str, Any] = {}
        for kind in KINDS:
            value = data.get(kind)
            if value is not None and not (isinstance(value, Mapping) and
                                          all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
                raise ValueError(f"{source}: {kind!r} must map class names to class names, got {value!r}")
            maps[kind] = dict(value) if value is not None else None
            never = data.get(f"no_{kind}", [])
            if not isinstance(never, (list, tuple)) or not all(isinstance(c, str) for c in never):
                raise ValueError(f"{source}: 'no_{kind}' must be a list of class names, got {never!r}")
            maps[f"no_{kind}"] = list(never)
        return cls(**maps)

    def resolve(self, classes: Sequence[str], p_hflip: float = 0.5, p_reverse: float = 0.5) -> "ClassMaps":
        """Check the maps against ``classes`` and turn them into index tables (:class:`ClassMaps`)."""
        classes = [str(c) for c in classes]
        index = {name: i for i, name in enumerate(classes)}
        tables = {}
        for kind, prob in (("hflip", p_hflip), ("reverse", p_reverse)):
            mapping, never = getattr(self, kind) or {}, getattr(self, f"no_{kind}")
            named = list(mapping) + list(mapping.values()) + list(never)
            unknown = sorted({c for c in named if c not in index})
            if unknown:
                raise ValueError(f"the {kind} declaration names unknown class(es) {unknown}; "
                                 f"the classes are: {classes}")
            partner: dict[str, str] = {}
            for a, b in mapping.items():
                for x, y in ((a, b), (b, a)):
                    if partner.setdefault(x, y) != y:
                        raise ValueError(f"the {kind} map sends class {x!r} to two classes, {partner[x]!r} and "
                                         f"{y!r}; each class has at most one partner")
            both = sorted(set(partner) & set(never))
            if both:
                raise ValueError(f"class(es) {both} are in the {kind} map and also in no_{kind}; "
                                 "a class is either mapped or never transformed")
            target = torch.arange(len(classes))
            allowed = torch.ones(len(classes), dtype=torch.bool)
            for name, other in partner.items():
                target[index[name]] = index[other]
            for name in never:
                allowed[index[name]] = False
            if not self.declared(kind):
                allowed[:] = False
            if not 0.0 <= prob <= 1.0:
                raise ValueError(f"the {kind} probability must be in [0, 1], got {prob!r}")
            tables[kind] = (target, allowed, float(prob) if self.declared(kind) else 0.0)
        return ClassMaps(classes, *tables["hflip"], *tables["reverse"])


@dataclass
class ClassMaps:
    """Index tables of checked :class:`LabelMaps`: ``*_target[c]`` the label after the transform,
    ``*_allowed[c]`` whether class c may be transformed, ``p_*`` the probability (0 when undeclared)."""

    classes: list[str]
    hflip_target: torch.Tensor
    hflip_allowed: torch.Tensor
    p_hflip: float
    reverse_target: torch.Tensor
    reverse_allowed: torch.Tensor
    p_reverse: float

    @property
    def active(self) -> bool:
        return self.p_hflip > 0 or self.p_reverse > 0

    def plan(self, labels: torch.Tensor, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flip (B,) bool, reverse (B,) bool, new labels (B,)) for clips of ``labels``.

        Always draws 2 x B numbers from ``generator`` so ranks that share it stay in step."""
        labels = labels.long()
        u = torch.rand(2, labels.shape[0], generator=generator)
        flip = (u[0] < self.p_hflip) & self.hflip_allowed[labels]
        reverse = (u[1] < self.p_reverse) & self.reverse_allowed[labels]
        out = torch.where(flip, self.hflip_target[labels], labels)
        out = torch.where(reverse, self.reverse_target[out], out)
        return flip, reverse, out

    def summary(self) -> dict[str, Any]:
        """What the run log records: per transform, the swapped pairs, the kept and the never-transformed classes."""
        info: dict[str, Any] = {}
        for kind in KINDS:
            target, allowed = getattr(self, f"{kind}_target"), getattr(self, f"{kind}_allowed")
            prob = getattr(self, f"p_{kind}")
            if prob == 0:
                info[kind] = "off"
                continue
            pairs = sorted({tuple(sorted((self.classes[i], self.classes[int(t)])))
                            for i, t in enumerate(target.tolist()) if t != i})
            info[kind] = {"p": prob, "swaps": [list(p) for p in pairs],
                          "never": [c for c, ok in zip(self.classes, allowed.tolist()) if not ok]}
        return info


def apply_plan(clips: torch.Tensor, flip: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
    """Flip (width axis) and/or reverse (time axis 1) the clips of (B,T,...) where the masks say; a new tensor."""
    out = clips.clone()
    if flip.any():
        out[flip] = out[flip].flip(-1)
    if reverse.any():
        out[reverse] = out[reverse].flip(1)
    return out


def parse_map(text: str, what: str = "map") -> dict[str, str]:
    """``"a:b,c:d"`` or a JSON file / JSON object text -> {"a": "b", "c": "d"}."""
    text = str(text).strip()
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as fh:
            data = json.load(fh)
    elif text.startswith("{"):
        data = json.loads(text)
    else:
        data = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            if item.count(":") != 1 or not all(s.strip() for s in item.split(":")):
                raise ValueError(f"{what}: {item!r} is not CLASS:PARTNER (expected e.g. 'move_left:move_right,...')")
            a, b = (s.strip() for s in item.split(":"))
            if data.setdefault(a, b) != b:
                raise ValueError(f"{what} sends class {a!r} to two classes, {data[a]!r} and {b!r}")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{what} must map class names to class names, got {data!r}")
    return data


def load_label_maps(root: str | os.PathLike) -> LabelMaps | None:
    """``LabelMaps`` from ``root/augment.json`` (``root`` a video folder or a CSV's folder), or None."""
    folder = Path(root)
    folder = folder if folder.is_dir() else folder.parent
    path = folder / AUGMENT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None
    return LabelMaps.from_dict(data, source=repr(str(path)))
