"""The Gradio page over a :class:`~backpatch.demo.Demo`: the Blocks layout (clip, prompt, controls, answers) and its
event wiring, including the API endpoints ``/compare`` and ``/save_preset`` (parameter names and order are the
API's), and the labels that follow the preset the controls make."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import gradio as gr

from ..controls import Control
from ..preset import Preset, methods_label
from .compare import TOP_K, Demo
from .text import _extra_patches_note, _intro, methods_status


def _view(demo: Demo, preset: Preset) -> tuple[Any, ...]:
    """What names the preset on the page: the title, the methods line and the labels over the right answer."""
    label = f"With the preset: {methods_label(preset)}"
    return (_intro(demo, preset), methods_status(preset), gr.update(label=label),
            gr.update(label=f"{label}: top-5 first-token probabilities"))


#: the controls the demo API took first, by position, when it was released (back-patching's first patch, contrastive
#: alpha, the back-patching switch); every other control follows the preset and uploads arguments
_API_HEAD = ("source", "target", "scale", "mode", "positions", "alpha", "patch_on")
#: the controls that followed preset and uploads when they were added, in that order; newer ones come after them
_API_TAIL = ("attention_alpha", "steering_beta", "gate_on", "gate_signal", "gate_low", "gate_high", "plausibility",
             "agreement")


def _signature(*names: str) -> inspect.Signature:
    """A handler's signature with the API's parameter names (gradio reads them from the signature)."""
    return inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])


def _widget(control: Control, value: Any, num_layers: int, live: bool) -> Any:
    """The gradio component for one declared control; ``elem_id`` is ``bp-`` and its name (``bp-gate-low``)."""
    common = {"label": control.label, "value": value, "elem_id": "bp-" + control.name.replace("_", "-"),
              "interactive": live}
    if control.info:
        common["info"] = control.info
    if control.kind == "switch":
        return gr.Checkbox(**{**common, "interactive": True})
    if control.kind == "layer":
        return gr.Slider(-num_layers, num_layers - 1, step=1, **common)
    if control.kind == "choice":
        return gr.Dropdown(choices=list(control.choices), **common)
    return gr.Number(minimum=control.minimum, **common)


def _control_widgets(demo: Demo, start: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[Any, list[Any]]]]:
    """Every registered method's controls, a method's switch on its own line and the rest in a row, greyed out while
    the switch is off: ``({name: component}, [(switch, its method's other components)])``."""
    widgets: dict[str, Any] = {}
    switches: list[tuple[Any, list[Any]]] = []
    for _method, controls in demo.control_specs(demo.preset):
        switch = controls[0] if controls and controls[0].kind == "switch" else None
        live = bool(start[switch.name]) if switch is not None else True
        if switch is not None:
            widgets[switch.name] = _widget(switch, start[switch.name], demo.num_layers, True)
        rest = controls[1:] if switch is not None else controls
        if rest:
            with gr.Row():
                for control in rest:
                    widgets[control.name] = _widget(control, start[control.name], demo.num_layers, live)
        if switch is not None:
            switches.append((widgets[switch.name], [widgets[c.name] for c in rest]))
    return widgets, switches


def _greying(count: int) -> Any:
    """A switch's handler: its method's ``count`` other controls live while it is on, greyed out while off."""
    return lambda on: [gr.update(interactive=bool(on))] * count


def build_app(model: Any, processor: Any, preset: Preset | str | Path | None = None,
              model_name: str | None = None) -> gr.Blocks:
    """The Gradio Blocks app over one model instance (queued, one request at a time)."""
    demo = Demo(model, processor, preset, model_name)
    return _blocks(demo)


def _blocks(demo: Demo) -> gr.Blocks:
    start = demo.controls(demo.preset)
    showcase = demo.showcase() if demo.clips else None
    first_clip, first_prompt = showcase if showcase else ((demo.clips[0], demo.clips[0].conflict_prompts[0])
                                                          if demo.clips else (None, ""))
    label = f"With the preset: {methods_label(demo.preset)}"

    with gr.Blocks(title="backpatch demo", analytics_enabled=False) as app:
        app.backpatch_demo = demo  # for tests and embedding apps
        uploaded = gr.State({})
        intro = gr.Markdown(_intro(demo, demo.preset), elem_id="bp-intro")
        with gr.Row():
            with gr.Column(scale=3):
                audio = gr.Audio(value=str(first_clip.path) if first_clip else None, sources=["upload", "microphone"],
                                 type="filepath", label="Audio clip", elem_id="bp-audio")
                if demo.clips:
                    with gr.Row():
                        example = gr.Dropdown(choices=[(c.label, c.key) for c in demo.clips],
                                              value=first_clip.key, label="Example clip (shipped with the organism)",
                                              elem_id="bp-example", scale=2)
                        example_prompt = gr.Dropdown(choices=[i.prompt for i in first_clip.items],
                                                     value=first_prompt, label="Example prompt",
                                                     elem_id="bp-example-prompt", scale=3)
                prompt = gr.Textbox(value=first_prompt, label="Prompt", lines=2, elem_id="bp-prompt",
                                    placeholder="Ask about the audio, e.g. a misleading 'The speaker says ...'")
                compare_btn = gr.Button("Compare", variant="primary", elem_id="bp-compare")
            with gr.Column(scale=2):
                preset_dd = gr.Dropdown(choices=list(demo.presets), value=demo.preset.name,
                                        label="Preset (bundled presets matching this model)", elem_id="bp-preset")
                status = gr.Markdown(methods_status(demo.preset), elem_id="bp-methods")
                widgets, switches = _control_widgets(demo, start)
                extra = gr.Markdown(_extra_patches_note(demo.preset))
                with gr.Accordion("Save or load a preset", open=False):
                    save_name = gr.Textbox(value=f"{demo.preset.name}-custom", label="Name of the saved preset",
                                           elem_id="bp-save-name")
                    save_btn = gr.Button("Save controls as preset YAML", elem_id="bp-save")
                    saved = gr.File(label="Preset YAML (download)", interactive=False, elem_id="bp-saved")
                    upload = gr.File(label="Load a preset YAML", file_types=[".yaml", ".yml"], type="filepath",
                                     elem_id="bp-upload")
        verdict = gr.HTML(label="Verdict", elem_id="bp-verdict")
        with gr.Row(equal_height=True):
            with gr.Column():
                plain_text = gr.Textbox(label="Plain model", interactive=False, elem_id="bp-plain-answer")
                plain_top = gr.Label(num_top_classes=TOP_K, label="Plain: top-5 first-token probabilities",
                                     show_heading=False, elem_id="bp-plain-top")
            with gr.Column():
                patched_text = gr.Textbox(label=label, interactive=False, elem_id="bp-patched-answer")
                patched_top = gr.Label(num_top_classes=TOP_K, label=f"{label}: top-5 first-token probabilities",
                                       show_heading=False, elem_id="bp-patched-top")

        # The API's parameters: audio, prompt, the first released controls in their released order, preset,
        # uploaded, then every other control in registry order (plugins' last), so callers that pass the first
        # arguments by position keep working. Parameter names become the API's (gradio_client's view_api).
        head = [n for n in _API_HEAD if n in widgets]
        tail = [n for n in _API_TAIL if n in widgets] + [n for n in widgets if n not in head and n not in _API_TAIL]
        names = [*head, *tail]
        controls = [widgets[n] for n in names]
        view = [intro, status, patched_text, patched_top]

        def split(args: tuple) -> tuple[dict[str, Any], Any, Any]:
            """``(*head, preset, uploaded, *tail)`` as control values by name, the preset's name and the uploads."""
            k = len(head)
            return ({**dict(zip(head, args[:k], strict=True)), **dict(zip(tail, args[k + 2:], strict=True))},
                    args[k], args[k + 1])

        def on_compare(audio, prompt, *args):
            values, preset, up = split(args)
            r = demo.compare(audio, prompt, preset_name=preset, uploaded=up, **values)
            return r.plain, r.patched, r.plain_top, r.patched_top, r.verdict_html

        on_compare.__signature__ = _signature("audio", "prompt", *head, "preset", "uploaded", *tail)
        api_inputs = [*(widgets[n] for n in head), preset_dd, uploaded, *(widgets[n] for n in tail)]
        compare_btn.click(on_compare, inputs=[audio, prompt, *api_inputs],
                          outputs=[plain_text, patched_text, plain_top, patched_top, verdict],
                          api_name="compare", concurrency_limit=1, concurrency_id="model")
        prompt.submit(on_compare, inputs=[audio, prompt, *api_inputs],
                      outputs=[plain_text, patched_text, plain_top, patched_top, verdict],
                      api_visibility="private", concurrency_limit=1, concurrency_id="model")

        def on_preset(name, up):
            base = demo.base_preset(name, up)
            demo.fit(base)
            c = demo.controls(base)
            return (*(c[n] for n in names), _extra_patches_note(base), f"{base.name}-custom", *_view(demo, base))

        preset_outputs = [*controls, extra, save_name, *view]
        preset_dd.input(on_preset, inputs=[preset_dd, uploaded], outputs=preset_outputs, api_visibility="private")

        def on_upload(path, up):
            if not path:
                return gr.skip()
            preset = demo.load_preset_file(path)
            up = {**(up or {}), preset.name: preset}
            choices = list(dict.fromkeys([*demo.presets, *up]))
            return (gr.update(choices=choices, value=preset.name), up, *on_preset(preset.name, up))

        upload.upload(on_upload, inputs=[upload, uploaded], outputs=[preset_dd, uploaded, *preset_outputs],
                      api_visibility="private")

        def on_save(*args):  # (*head, preset, uploaded, name, *tail): the released order
            values, preset, up = split((*args[:len(head) + 2], *args[len(head) + 3:]))
            made = demo.preset_from_controls(preset, uploaded=up, **values)
            return str(demo.save_preset(made, args[len(head) + 2]))

        on_save.__signature__ = _signature(*head, "preset", "uploaded", "name", *tail)
        save_btn.click(on_save, inputs=[*(widgets[n] for n in head), preset_dd, uploaded, save_name,
                                        *(widgets[n] for n in tail)], outputs=saved, api_name="save_preset")

        # a switch greys out the controls of its method, and the page names what the controls now run
        for switch, others in switches:
            switch.change(_greying(len(others)), inputs=switch, outputs=others, api_visibility="private", queue=False)

        def on_controls(preset, up, *values):
            try:
                made = demo.preset_from_controls(preset, uploaded=up, **dict(zip(names, values, strict=True)))
            except gr.Error as exc:
                return gr.skip(), f"The controls do not make a preset that can run: {exc.message}", gr.skip(), gr.skip()
            return _view(demo, made)

        gr.on([c.change for c in controls], on_controls, inputs=[preset_dd, uploaded, *controls], outputs=view,
              api_visibility="private", queue=False, show_progress="hidden")

        if demo.clips:
            def on_example(key):
                clip = demo.clip(key)
                first = clip.conflict_prompts[0] if clip.conflict_prompts else clip.items[0].prompt
                return str(clip.path), gr.update(choices=[i.prompt for i in clip.items], value=first), first

            example.input(on_example, inputs=example, outputs=[audio, example_prompt, prompt],
                          api_visibility="private")
            example_prompt.input(lambda p: p, inputs=example_prompt, outputs=prompt, api_visibility="private",
                                 queue=False)

            def on_prompt_typed(text, key):  # keep the example-prompt menu honest about what the prompt says
                choices = [i.prompt for i in demo.clip(key).items] if key else []
                return gr.update(value=text if text in choices else None)

            prompt.input(on_prompt_typed, inputs=[prompt, example], outputs=example_prompt, api_visibility="private",
                         show_progress="hidden", queue=False)
            gr.Examples(examples=[[str(c.path), c.conflict_prompts[0]] for c in demo.clips if c.conflict_prompts],
                        inputs=[audio, prompt], label="Example clips with misleading prompts (click one to load it)",
                        examples_per_page=10)
    app.queue(default_concurrency_limit=1)
    return app
