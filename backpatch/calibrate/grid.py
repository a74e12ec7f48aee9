"""What calibration searches over: patch settings, candidates (a patch and/or a contrastive alpha), and grids.

Two ways to say what to search:

- an explicit grid (``sources x targets x scales x modes x positions``, :func:`default_grid` or the user's
  ``--sources/--targets/...``): every setting is scored on every item;
- the default staged search (:func:`band_grid` then :func:`refinements`, run by :mod:`.search`): nearby
  pairs across the whole depth (s - t = 1, 2, 4) as well as far pairs (8, 16, late -> early), small scales
  as well as large, every mode and both positions, coarse first and refined around the best no-harm settings.
  On ``smol-whisper`` the settings that help are gentle patches between nearby layers, a band the old
  late-half-to-early-half grid never visits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from ..methods import Contrastive, Gate, Patch, gate_label, patch_label
from ..registry import get_method, registered_methods


@dataclass(frozen=True)
class Setting:
    source: int
    target: int
    scale: float
    mode: str
    positions: str

    def patch(self, agreement: float | None = None) -> Patch:
        """This setting as a preset's patch, with the agreement guard ``agreement`` (None: none)."""
        return Patch(self.source, self.target, self.scale, self.mode, self.positions, agreement=agreement)

    def label(self) -> str:
        return patch_label(self)


@dataclass(frozen=True)
class Candidate:
    """What a preset applies: an optional patch setting, an optional contrastive alpha and gate (the three have
    searches of their own), and the blocks of any other registered method (``(key, setting)`` pairs in registry
    order: attention to audio, audio-silence steering, a plugin's), searched from each method's calibration grid."""

    setting: Setting | None
    alpha: float = 0.0
    gate: Gate | None = None
    blocks: tuple[tuple[str, Any], ...] = ()
    #: contrastive decoding's plausibility guard (VCD/AAD): only tokens with p(y | audio) >= this x max p may win
    plausibility: float | None = None
    #: contrastive decoding's agreement guard: an answer the audio raised by >= this (nats) over null audio is kept
    agreement: float | None = None
    #: the patch's agreement guard (``Patch.agreement``): rows whose unpatched answer the audio raised by >= this
    #: (nats) over null audio are not patched
    patch_agreement: float | None = None

    @classmethod
    def of(cls, setting: Setting | None = None, alpha: float = 0.0, gate: Gate | None = None,
           plausibility: float | None = None, agreement: float | None = None, patch_agreement: float | None = None,
           **blocks: Any) -> Candidate:
        """A candidate with blocks given by method key (``Candidate.of(attention=Attention(...))``); None leaves a
        block out."""
        order = {m.key: i for i, m in enumerate(registered_methods())}
        for key in blocks:
            get_method(key)  # a PresetError naming the registered keys
        pairs = sorted(((k, v) for k, v in blocks.items() if v is not None), key=lambda kv: order[kv[0]])
        return cls(setting, alpha, gate, tuple(pairs), plausibility, agreement, patch_agreement)

    def block(self, key: str) -> Any:
        """This candidate's setting of block method ``key`` (None when it has none)."""
        return dict(self.blocks).get(key)

    def with_blocks(self, **blocks: Any) -> Candidate:
        return Candidate.of(self.setting, self.alpha, self.gate, self.plausibility, self.agreement,
                            self.patch_agreement, **{**dict(self.blocks), **blocks})

    def __hash__(self) -> int:  # a plugin's config need not be hashable: hash what its method writes
        return hash((self.setting, self.alpha, self.gate, self.plausibility, self.agreement, self.patch_agreement,
                     tuple((k, _frozen(get_method(k).dump(c))) for k, c in self.blocks)))

    def sections(self, null_audio: str) -> dict[str, Any]:
        """The preset sections this candidate sets, by method key (contrastive at alpha 0 where a setting reads its
        null-audio rows; None where it sets nothing)."""
        rows = self.null_rows
        return {"patches": [self.setting.patch(self.patch_agreement)] if self.setting else [],
                "contrastive": Contrastive(alpha=self.alpha, null_audio=null_audio,
                                           plausibility=self.plausibility if self.alpha else None,
                                           agreement=self.agreement if self.alpha else None) if rows else None,
                "gate": self.gate, **dict(self.blocks)}

    def label(self) -> str:
        guard = f" plausibility {self.plausibility:g}" if self.plausibility is not None else ""
        guard += f" agreement {self.agreement:g}" if self.agreement is not None else ""
        parts = ([patch_label(self.setting.patch(self.patch_agreement))] if self.setting else []) + (
            [f"contrastive a={self.alpha:g}{guard}"] if self.alpha else [])
        parts += [line for key, config in self.blocks for line in get_method(key).details(config)]
        text = " + ".join(parts) or "plain"
        return f"{text} | {gate_label(self.gate)}" if self.gate is not None else text

    @property
    def has_blocks(self) -> bool:
        return bool(self.blocks)

    @property
    def null_rows(self) -> bool:
        """Whether its preset rides null-audio rows (each method's own rule: contrastive decoding, an audio_gap gate
        and steering read them)."""
        sections = {"patches": [self.setting.patch(self.patch_agreement)] if self.setting else None,
                    "contrastive": Contrastive(alpha=self.alpha) if self.alpha else None, "gate": self.gate,
                    **dict(self.blocks)}
        return any(get_method(key).needs_null_rows(config) for key, config in sections.items() if config is not None)


def _frozen(data: Any) -> Any:
    """Plain data (a method's dump) as something hashable."""
    if isinstance(data, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in data.items()))
    if isinstance(data, list | tuple):
        return tuple(_frozen(v) for v in data)
    return data


def block_grid(num_layers: int) -> list[Candidate]:
    """The candidates of the staged search's refine stage that try a method as a block of its own: each registered
    method's own calibration grid (``Method.calibration_grid``: MATA's alphas, steering's betas, a plugin's), in
    registry order."""
    return [Candidate.of(**{method.key: config}) for method in registered_methods()
            for config in method.calibration_grid(num_layers)]


#: plausibility guards the refine stage tries on every contrastive candidate (VCD's 0.1 and stricter ones)
PLAUSIBILITY_GRID = (0.1, 0.3, 0.5)
#: agreement guards (nats) it tries on every contrastive candidate: 0 keeps every answer the audio raised at all;
#: on smol-whisper's every-family validation only these made the per-family rule satisfiable (issue 28)
AGREEMENT_GRID = (0.0, 0.1, 0.2, 0.3)


#: the patch's agreement guards (nats) the refine stage tries on the strongest and the best patches: on
#: smol-whisper's every-family validation a 1-nat guard kept the scale-1 patch's whole TDR cut and removed its harm
#: on noisy audio-only items (issue 28); a guard is a 0/1 step per row, so it reuses the patch's logits
PATCH_AGREEMENT_GRID = (0.5, 1.0, 2.0)


#: the gate stage's steps per signal: audio_gap is a total variation distance, certainty exp(-entropy)
GATE_STEPS = {"audio_gap": (0.05, 0.1, 0.2, 0.3, 0.5), "certainty": (0.3, 0.5, 0.7, 0.9)}
#: ramps (low, high) of the audio_gap signal, the one that removed harm on perturbed speech (README, issue 18)
GATE_RAMPS = {"audio_gap": ((0.1, 0.3), (0.2, 0.4))}


def gate_grid() -> list[Gate]:
    """Gates the staged search tries on its strongest settings: a step at each threshold of each signal, and a
    few ramps.

    Steps (``low == high``) patch a row fully or not at all, so every step gate of one setting reuses that
    setting's patched logits (no forward pass). Ramps weaken the mitigation gradually where the audio is
    half-clear; a ramp costs a forward for a patch, nothing for contrastive decoding alone (its alpha is per
    row on stored logits)."""
    steps = [Gate(signal, step, step) for signal, steps in GATE_STEPS.items() for step in steps]
    return steps + [Gate(signal, low, high) for signal, ramps in GATE_RAMPS.items() for low, high in ramps]


def default_grid(num_layers: int) -> dict[str, list]:
    """Late half as sources, early half as targets; add at three scales, replace at 1; audio and last."""
    half = num_layers // 2
    return {
        "sources": list(range(half, num_layers)),
        "targets": list(range(0, half)),
        "scales": [0.5, 1.0, 2.0],
        "modes": ["add", "replace"],
        "positions": ["audio", "last"],
        # contrastive decoding, alone and combined with the best patch settings (empty list: patches only)
        "alphas": [1.0, 2.0, 4.0],
        "null_audio": "silence",
    }


def _settings(grid: dict[str, list]) -> list[Setting]:
    out = []
    for s, t, mode, positions in itertools.product(grid["sources"], grid["targets"], grid["modes"], grid["positions"]):
        if s <= t:
            continue
        scales = [1.0] if mode == "replace" and 1.0 in grid["scales"] else grid["scales"]
        out += [Setting(s, t, float(a), mode, positions) for a in scales]
    return out


#: (mode, scale) tried at each pair in the coarse stage; small and large, every mode
COARSE_AUDIO = (("add", 0.1), ("add", 1.0), ("interpolate", 0.5), ("replace", 1.0))
COARSE_LAST = (("interpolate", 0.5), ("replace", 1.0))
#: layer distances s - t of the coarse stage: nearby pairs and far ones
DISTANCES = (1, 2, 4, 8, 16)


def band_pairs(num_layers: int) -> list[tuple[int, int]]:
    """(source, target) pairs of the coarse stage: targets every ~N/10 layers over the whole depth, each with
    sources 1, 2, 4, 8 and 16 layers later, plus the last layer into each target (late -> early)."""
    step = max(1, num_layers // 10)
    pairs = set()
    for t in range(0, num_layers - 1, step):
        for d in DISTANCES:
            if t + d < num_layers:
                pairs.add((t + d, t))
        pairs.add((num_layers - 1, t))
    return sorted(pairs, key=lambda st: (st[1], st[0]))


def band_grid(num_layers: int) -> list[Setting]:
    """Coarse stage of the staged search (6 settings per pair; 300 on a 30-layer model)."""
    out = []
    for s, t in band_pairs(num_layers):
        out += [Setting(s, t, scale, mode, "audio") for mode, scale in COARSE_AUDIO]
        out += [Setting(s, t, scale, mode, "last") for mode, scale in COARSE_LAST]
    return out


def _scales_around(setting: Setting) -> list[float]:
    if setting.mode == "replace":
        return [0.5, 1.0]
    factors = (0.5, 2.0)
    scales = {round(setting.scale * f, 4) for f in factors}
    if setting.mode == "interpolate":
        scales = {s for s in scales if s <= 1.0}
    return sorted(scales)


def refinements(best: list[Setting], num_layers: int) -> list[Setting]:
    """Neighbours of the best coarse settings: half and double the scale, and the source or target one layer
    either side (every layer is a candidate here, not only the coarse stride)."""
    out: list[Setting] = []
    for b in best:
        out += [Setting(b.source, b.target, s, b.mode, b.positions) for s in _scales_around(b)]
        for ds, dt in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1)):
            s, t = b.source + ds, b.target + dt
            if 0 <= t < s < num_layers:
                out.append(Setting(s, t, b.scale, b.mode, b.positions))
    seen = set(best)
    unique = []
    for s in out:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique
