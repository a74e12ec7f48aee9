"""Interventions as plugins: the protocol every method implements, and the one registry of methods.

A method (back-patching, contrastive decoding, attention to audio, audio-silence steering, the gate, or one a user
registers) is one :class:`Method` object, like a PEFT tuner registered with ``register_peft_method``. It owns one
preset section (``key``) and says, as data and small functions:

- its **schema**: the config dataclass of the section, how it is read from and written to plain data, and the rules
  it sets on the rest of a preset (steering needs the null-audio rows of a contrastive block, ...);
- what it **needs** from a call: null-audio rows riding in the batch, a capture pass;
- how it **installs** on one call (:meth:`Method.open`: hooks owned by the call, always removed by the engine);
- how it **describes** itself to people (a short label for a column, one detail line per setting).

Everything else reads this registry instead of naming methods: the preset schema's sections, the engine's install
loop, the labels of the CLI and the demo, and "does this preset need null-audio rows". This module imports neither
torch nor the engine: it is part of the schema layer, below every method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .controls import Control
from .validation import PresetError, fail, section_from_dict

__all__ = [
    "LayerSpace",
    "Method",
    "get_method",
    "register_method",
    "registered_methods",
    "unregister_method",
]


@dataclass(frozen=True)
class LayerSpace:
    """The decoder layers of one concrete model, for turning a preset's layer indices (negative counts from the end)
    into absolute ones with errors that name the key, the model's size and what is allowed."""

    num_layers: int
    layers_path: str
    origin: str | None = None

    def index(self, value: int, where: str) -> int:
        absolute = value + self.num_layers if value < 0 else value
        if not 0 <= absolute < self.num_layers:
            raise fail(where, f"layer {value} is out of range for this model, which has {self.num_layers} decoder "
                       f"layers at {self.layers_path} (allowed: {-self.num_layers}..{self.num_layers - 1})",
                       self.origin)
        return absolute

    def span(self, layers: list[int], where: str) -> tuple[int, int]:
        """``[a, b]`` (inclusive) as absolute indices, checked to run forwards in this model."""
        first, last = (self.index(value, f"{where}[{i}]") for i, value in enumerate(layers))
        if first > last:
            raise fail(where, f"{list(layers)} runs backwards in this {self.num_layers}-layer model (layers {first} "
                       f"to {last})", self.origin)
        return first, last


class Method:
    """One intervention. Subclass it, set the class attributes, override what differs, and register an instance.

    The defaults describe a section holding one config dataclass that is always on, needs nothing from the call,
    and installs nothing; the docstring of each hook says when to override it.
    """

    #: the preset section this method reads (``contrastive:``); also its name in the registry
    key: str = ""
    #: what people call it ("contrastive decoding"), for labels and the demo
    title: str = ""
    #: the dataclass of one setting (validated in its ``__post_init__``/``_validate(where, origin)``)
    config_cls: type | None = None
    #: the section is a list of settings (``patches:``) instead of one mapping
    many: bool = False
    #: a preset may hold this method alone (False for the gate, which only scales other methods)
    standalone: bool = True
    #: where the section stands in a written preset and in labels (lower first; ties: registration order)
    section_order: int = 100
    #: order of installation within one call (lower first): a method that changes the batch installs before the
    #: methods that read it (contrastive decoding appends the null-audio rows that the patches must skip)
    order: int = 100
    #: the session class the default :meth:`open` builds with ``(call, config)`` and installs (None: installs nothing)
    session_cls: type | None = None
    #: this method appends the null-audio rows to the batch (contrastive decoding): it is installed whenever any
    #: method of the call needs them, even where its own setting does not act
    provides_null_rows: bool = False

    # ------------------------------------------------------------------------------------------- schema
    def parse(self, data: Any, where: str, origin: str | None) -> Any:
        """The section's config from plain data (parsed YAML); :class:`PresetError` naming the key path."""
        if self.many:
            if not isinstance(data, list):
                raise fail(where, f"expected a list of {self.title} settings", origin)
            return [section_from_dict(self.config_cls, item, f"{where}[{i}]", origin) for i, item in enumerate(data)]
        return section_from_dict(self.config_cls, data, where, origin)

    def dump(self, config: Any) -> Any:
        """Plain data for YAML: unset (None) fields left out, so files stay readable."""
        if self.many:
            return [self._dump_one(item) for item in config]
        return self._dump_one(config)

    def _dump_one(self, config: Any) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(config).items() if v is not None}

    def accepts(self, config: Any) -> bool:
        """Whether ``config`` is a value of this section (checked when a preset is built in Python)."""
        if self.many:
            return isinstance(config, list) and all(isinstance(item, self.config_cls) for item in config)
        return isinstance(config, self.config_cls)

    def present(self, config: Any) -> bool:
        """Whether the section is set at all (an empty list of patches is not)."""
        return bool(config) if self.many else config is not None

    def check(self, preset: Any, config: Any, origin: str | None) -> None:
        """Rules this method sets on the rest of the preset; raise :class:`PresetError` (via ``fail``) to refuse."""

    # ----------------------------------------------------------------------------------------- needs
    def acts(self, config: Any) -> bool:
        """Whether this setting changes anything (``alpha: 0`` does not): a method that does not act is not installed
        (unless another method needs what it brings, see :meth:`needs_null_rows`)."""
        return True

    def needs_null_rows(self, config: Any) -> bool:
        """Whether this setting needs the null-audio rows (a copy of every row with the audio replaced by silence)
        riding in the batch; the contrastive method brings them."""
        return False

    # ----------------------------------------------------------------------------------------- engine
    def prepare(self, config: Any, processor: Any, origin: str | None) -> Any:
        """What this setting needs computed once per wrapped model rather than per call (silent audio features),
        from the processor; None for nothing. The engine hands it back as ``call.resources[key]``. Raise
        :class:`PresetError` when the processor cannot give it."""
        return None

    def resolve(self, config: Any, space: LayerSpace) -> Any:
        """The setting made concrete for one model (absolute layer indices), checked against it; by default the
        setting itself. Called once at ``wrap()`` time."""
        return config

    def open(self, call: Any, config: Any) -> Any:
        """Install this method's hooks for one call and return its session (an object with ``remove()``, also what
        tests and benchmarks read counts from), or None when it installs nothing. ``call`` is the engine's per-call
        context (:class:`backpatch.engine.Call`): the model facts, the hooks this call owns, the other methods'
        settings and sessions. ``config`` is the resolved setting. By default: ``session_cls(call, config)``, then its
        ``install()``."""
        if self.session_cls is None:
            return None
        session = self.session_cls(call, config)
        session.install()
        return session

    # ----------------------------------------------------------------------------------------- calibration
    def calibration_grid(self, num_layers: int) -> list[Any]:
        """The settings ``backpatch calibrate`` scores for this method as a block of its own in the refine stage
        (alone, then the best no-harm one on top of the best other settings), for a text decoder of
        ``num_layers`` layers; empty: not searched that way (back-patching, contrastive decoding and the gate have
        searches of their own)."""
        return []

    # ----------------------------------------------------------------------------------------- demo controls
    def controls(self, config: Any, num_layers: int) -> list[Control]:
        """The demo's controls for this method, in page order (``config``: the preset's setting, None when it has
        none; it may fill an info line). At most one ``switch``, first: it turns the method on and off. Empty (the
        default): the demo shows no control and keeps the preset's setting as it is."""
        return []

    def control_values(self, config: Any, num_layers: int) -> dict[str, Any]:
        """The values the controls start at for the preset's setting ``config`` (None: the method is off), one per
        control name."""
        return {}

    def from_controls(self, values: dict[str, Any], base: Any, num_layers: int) -> Any:
        """The setting the controls describe, or None for off. ``values`` holds one read value per control
        (:meth:`backpatch.Control.read` has checked its type); ``base`` is the preset's setting (keep what no control
        shows). A value no setting can hold raises :class:`backpatch.ControlError` with one sentence naming it."""
        return base

    # ----------------------------------------------------------------------------------------- describing
    def label(self, config: Any) -> str | None:
        """A few words for a column header (``contrastive a=2``), or None to say nothing there."""
        return self.title

    def details(self, config: Any) -> list[str]:
        """One line per setting with every value that matters (``backpatch presets``, the demo)."""
        return [self.label(config) or self.title]

    def summary(self, config: Any) -> str:
        """The method and its strength in a few words for a sentence (the demo's "On: ..." line)."""
        return self.title


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (PEFT's ``register_peft_method``): its section is read from presets, its hooks
    installed by ``wrap()``/``apply()``. A key already taken (by a built-in or another plugin) is refused unless
    ``replace``."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method expects a backpatch.Method instance, got {type(method).__name__}")
    if not method.key or not method.key.isidentifier():
        raise ValueError(f"a method's key names its preset section and must be an identifier, got {method.key!r}")
    if method.key in _RESERVED:
        raise ValueError(f"{method.key!r} is a preset key of the schema itself; choose another key")
    if method.key in _REGISTRY and not replace:
        raise ValueError(f"a method with key {method.key!r} is already registered "
                         f"({type(_REGISTRY[method.key]).__name__}); pass replace=True to replace it")
    _REGISTRY[method.key] = method
    return method


def unregister_method(key: str) -> None:
    """Remove a registered method (a plugin's tests clean up with it); built-ins can be removed too, at your risk."""
    _REGISTRY.pop(key, None)


def get_method(key: str) -> Method:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise PresetError(f"no method is registered for preset key {key!r}; registered: "
                          f"{', '.join(_REGISTRY)}") from None


def registered_methods() -> tuple[Method, ...]:
    """Every registered method in section order (the order of sections in a written preset and of labels)."""
    return tuple(sorted(_REGISTRY.values(), key=lambda method: method.section_order))


#: top-level preset keys that belong to the schema, not to a method
_RESERVED = frozenset({"version", "name", "description", "match", "model", "audio_span", "calibration", "extensions",
                       "origin"})
