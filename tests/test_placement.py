"""Placement and precision: accelerate-dispatched models (disk offload included) and bf16/fp16."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_qwen2_audio
from transformers import Qwen2AudioForConditionalGeneration

import backpatch
from backpatch import Patch, Preset

KWARGS = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


def test_dispatched_model_with_disk_offload_matches_in_memory(tmp_path, batch):
    """Layers 1 and 4 live on disk behind accelerate hooks; the source (4) and target (1) are among them."""
    model = tiny_qwen2_audio()
    preset = Preset(patches=[Patch(source=4, target=1, scale=0.7), Patch(source=5, target=0, positions="last")])
    expected = backpatch.wrap(model, preset).generate(**batch, **KWARGS).logits
    model.save_pretrained(tmp_path / "ckpt")
    device_map = {name: "cpu" for name in ("model.audio_tower", "model.multi_modal_projector", "lm_head",
                                           "model.language_model.embed_tokens", "model.language_model.norm",
                                           "model.language_model.rotary_emb")}
    device_map |= {f"model.language_model.layers.{i}": "disk" if i in (1, 4) else "cpu" for i in range(6)}
    dispatched = Qwen2AudioForConditionalGeneration.from_pretrained(
        tmp_path / "ckpt", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert dispatched.hf_device_map["model.language_model.layers.4"] == "disk"
    got = backpatch.wrap(dispatched, preset).generate(**batch, **KWARGS).logits
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert backpatch.backpatch_hook_count(dispatched) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(batch, dtype):
    model = tiny_qwen2_audio().to(dtype)
    zero = backpatch.wrap(model, Preset(patches=[Patch(source=-2, target=1, scale=0.0)]))
    out, ref = zero.generate(**batch, **KWARGS), model.generate(**batch, **KWARGS)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))
    patched = backpatch.wrap(model, Preset(patches=[Patch(source=-1, target=0, scale=2.0)]))
    logits = patched.generate(**batch, **KWARGS).logits[0]
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits[:2], ref.logits[0][:2])
