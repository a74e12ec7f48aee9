"""The Gradio page over a :class:`~backpatch.demo.Demo`: the Blocks layout (clip, prompt, controls, answers) and its
event wiring, including the API endpoints ``/compare`` and ``/save_preset`` (parameter names and order are the
API's), and the labels that follow the preset the controls make."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ..methods.backpatching import MODES, POSITIONS
from ..methods.gate import GATE_SIGNALS
from ..preset import Preset, methods_label
from .compare import TOP_K, Demo
from .text import _extra_patches_note, _intro, methods_status


def _view(demo: Demo, preset: Preset) -> tuple[Any, ...]:
    """What names the preset on the page: the title, the methods line and the labels over the right answer."""
    label = f"With the preset: {methods_label(preset)}"
    return (_intro(demo, preset), methods_status(preset), gr.update(label=label),
            gr.update(label=f"{label}: top-5 first-token probabilities"))


def build_app(model: Any, processor: Any, preset: Preset | str | Path | None = None,
              model_name: str | None = None) -> gr.Blocks:
    """The Gradio Blocks app over one model instance (queued, one request at a time)."""
    demo = Demo(model, processor, preset, model_name)
    return _blocks(demo)


def _blocks(demo: Demo) -> gr.Blocks:
    start = demo.controls(demo.preset)
    n = demo.num_layers
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
                patch_on = gr.Checkbox(value=start["patch_on"], label="Back-patching on (first patch below)",
                                       info="off: the patch controls below are greyed out and not applied",
                                       elem_id="bp-patch-on")
                live = start["patch_on"]  # patch controls look live only while back-patching is on
                with gr.Row():
                    source = gr.Slider(-n, n - 1, value=start["source"], step=1, label="Source layer",
                                       info=f"{n} layers; negative counts from the end", interactive=live,
                                       elem_id="bp-source")
                    target = gr.Slider(-n, n - 1, value=start["target"], step=1, label="Target layer",
                                       interactive=live, elem_id="bp-target")
                with gr.Row():
                    scale = gr.Number(value=start["scale"], label="Scale", interactive=live, elem_id="bp-scale")
                    mode = gr.Dropdown(choices=list(MODES), value=start["mode"], label="Mode", interactive=live,
                                       elem_id="bp-mode")
                    positions = gr.Dropdown(choices=list(POSITIONS), value=start["positions"], label="Positions",
                                            interactive=live, elem_id="bp-positions")
                alpha = gr.Number(value=start["alpha"], minimum=0, label="Contrastive alpha (0 = off)",
                                  elem_id="bp-alpha")
                spans = demo.block_layers(demo.preset)
                with gr.Row():
                    attention_alpha = gr.Number(
                        value=start["attention_alpha"], minimum=0, label="Attention to audio alpha (MATA; 0 = off)",
                        info="layers {}..{} (the preset's, else the middle third)".format(*spans["attention"]),
                        elem_id="bp-attention-alpha")
                    steering_beta = gr.Number(
                        value=start["steering_beta"], label="Audio-silence steering beta (0 = off)",
                        info="layers {}..{} (the preset's, else the middle third)".format(*spans["steering"]),
                        elem_id="bp-steering-beta")
                gate_on = gr.Checkbox(value=start["gate_on"], label="Audio-confidence gate on",
                                      info="scales the patches and contrastive alpha by how much the audio supports "
                                      "the answer: none below low, full from high on (a step when low = high)",
                                      elem_id="bp-gate-on")
                with gr.Row():
                    gate_signal = gr.Dropdown(choices=list(GATE_SIGNALS), value=start["gate_signal"],
                                              label="Gate signal", interactive=start["gate_on"],
                                              elem_id="bp-gate-signal")
                    gate_low = gr.Number(value=start["gate_low"], label="Gate low (0 to 1)",
                                         interactive=start["gate_on"], elem_id="bp-gate-low")
                    gate_high = gr.Number(value=start["gate_high"], label="Gate high (0 to 1)",
                                          interactive=start["gate_on"], elem_id="bp-gate-high")
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

        controls = [source, target, scale, mode, positions, alpha, patch_on]
        blocks = [attention_alpha, steering_beta]
        gates = [gate_on, gate_signal, gate_low, gate_high]
        view = [intro, status, patched_text, patched_top]

        # Parameter names become the API's argument names (gradio_client's view_api shows them).
        # attention_alpha, steering_beta and then the gate controls come last, so API callers that pass the first
        # arguments by position keep working
        def on_compare(audio, prompt, source, target, scale, mode, positions, alpha, patch_on, preset, uploaded,
                       attention_alpha, steering_beta, gate_on, gate_signal, gate_low, gate_high):
            r = demo.compare(audio, prompt, source, target, scale, mode, positions, alpha, patch_on, preset, uploaded,
                             attention_alpha, steering_beta, gate_on, gate_signal, gate_low, gate_high)
            return r.plain, r.patched, r.plain_top, r.patched_top, r.verdict_html

        compare_btn.click(on_compare, inputs=[audio, prompt, *controls, preset_dd, uploaded, *blocks, *gates],
                          outputs=[plain_text, patched_text, plain_top, patched_top, verdict],
                          api_name="compare", concurrency_limit=1, concurrency_id="model")
        prompt.submit(on_compare, inputs=[audio, prompt, *controls, preset_dd, uploaded, *blocks, *gates],
                      outputs=[plain_text, patched_text, plain_top, patched_top, verdict],
                      api_visibility="private", concurrency_limit=1, concurrency_id="model")

        def on_preset(name, up):
            base = demo.base_preset(name, up)
            demo.fit(base)
            c = demo.controls(base)
            return (c["source"], c["target"], c["scale"], c["mode"], c["positions"], c["alpha"], c["patch_on"],
                    c["attention_alpha"], c["steering_beta"], c["gate_on"], c["gate_signal"], c["gate_low"],
                    c["gate_high"], _extra_patches_note(base), f"{base.name}-custom", *_view(demo, base))

        preset_outputs = [*controls, *blocks, *gates, extra, save_name, *view]
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

        def from_controls(preset, up, source, target, scale, mode, positions, alpha, patch_on, attention_alpha,
                          steering_beta, gate_on, gate_signal, gate_low, gate_high):
            return demo.preset_from_controls(preset, source, target, scale, mode, positions, alpha, patch_on, up,
                                             attention_alpha=attention_alpha, steering_beta=steering_beta,
                                             gate_on=gate_on, gate_signal=gate_signal, gate_low=gate_low,
                                             gate_high=gate_high)

        def on_save(source, target, scale, mode, positions, alpha, patch_on, preset, uploaded, name, attention_alpha,
                    steering_beta, gate_on, gate_signal, gate_low, gate_high):
            made = from_controls(preset, uploaded, source, target, scale, mode, positions, alpha, patch_on,
                                 attention_alpha, steering_beta, gate_on, gate_signal, gate_low, gate_high)
            return str(demo.save_preset(made, name))

        save_btn.click(on_save, inputs=[*controls, preset_dd, uploaded, save_name, *blocks, *gates], outputs=saved,
                       api_name="save_preset")

        # switches grey out the controls they turn off, and the page names what the controls now run
        patch_on.change(lambda on: [gr.update(interactive=bool(on))] * 5, inputs=patch_on,
                        outputs=[source, target, scale, mode, positions], api_visibility="private", queue=False)
        gate_on.change(lambda on: [gr.update(interactive=bool(on))] * 3, inputs=gate_on,
                       outputs=[gate_signal, gate_low, gate_high], api_visibility="private", queue=False)

        def on_controls(preset, up, *values):  # values: the controls, blocks and gates, in that order
            try:
                made = from_controls(preset, up, *values)
            except gr.Error as exc:
                return gr.skip(), f"The controls do not make a preset that can run: {exc.message}", gr.skip(), gr.skip()
            return _view(demo, made)

        gr.on([c.change for c in [*controls, *blocks, *gates]], on_controls,
              inputs=[preset_dd, uploaded, *controls, *blocks, *gates], outputs=view, api_visibility="private",
              queue=False, show_progress="hidden")

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
