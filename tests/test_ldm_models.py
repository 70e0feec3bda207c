"""models.ldm: registry, conditioning encoder, layout planes, guidance, export to diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataengine.models import ldm


@pytest.fixture(scope="module")
def tok():
    caps = ["a red square on a plain background", "a blue circle on a plain background"] * 4
    return ldm.train_tokenizer(caps, [1, 2, 90], vocab_size=200, max_length=16)


def test_tokenizer_is_offline_and_round_trips(tok, tmp_path):
    ids = ldm.tokenize(tok, ["<c2> a blue circle", ""], 16)
    assert ids.shape == (2, 16) and ids.dtype == torch.int64
    assert tok.convert_ids_to_tokens(int(ids[0, 1])) == "<c2>"  # a class token is one embedding
    assert ids[0, 0] == tok.bos_token_id and (ids[1, 2:] == tok.pad_token_id).all()
    again = ldm.tokenizer_from_json(ldm.tokenizer_to_json(tok), 16)
    assert torch.equal(ldm.tokenize(again, ["<c2> a blue circle"], 16), ids[:1])
    tok.save_pretrained(tmp_path)
    assert torch.equal(ldm.tokenize(ldm.load_tokenizer(str(tmp_path)), ["<c90>"], 16)[0, 1],
                       torch.tensor(tok.convert_tokens_to_ids("<c90>")))


def test_prompt_uses_only_the_spec_conditions():
    spec = ldm.LdmSpec(unet="test", text="test", conditions=["class"])
    assert ldm.prompt_for(spec, [3, 1, 3], "a dog") == "<c1> <c3>"
    spec = ldm.LdmSpec(unet="test", text="test", conditions=["caption", "layout"])
    assert ldm.prompt_for(spec, [3], "a dog") == "a dog"


def test_spec_validation_names_field():
    with pytest.raises(ValueError, match="unet='huge'"):
        ldm.LdmSpec(unet="huge")
    with pytest.raises(ValueError, match="conditions"):
        ldm.LdmSpec(conditions=["depth"])
    with pytest.raises(ValueError, match="p_uncond"):
        ldm.LdmSpec(p_uncond=1.5)


def test_tiny_vae_is_f4_with_16x16x4_latents():
    vae = ldm.build_vae("tiny-f4")
    assert ldm.vae_factor(vae) == 4
    mean, logvar = ldm.encode_images(vae, torch.zeros(1, 3, 64, 64))
    assert mean.shape == logvar.shape == (1, 4, 16, 16)
    assert ldm.decode_latents(vae, mean, 1.0).shape == (1, 3, 64, 64)


def test_published_configs_are_registered():
    assert ldm.VAE_CONFIGS["sd-kl-f8"]["block_out_channels"] == (128, 256, 512, 512)
    assert ldm.UNET_CONFIGS["sd-v1"]["cross_attention_dim"] == 768


def test_unet_shapes_with_layout_concatenated(tok):
    spec = ldm.LdmSpec(unet="test", text="test", latent_size=8)
    model = ldm.LatentDiffusion(spec, tok)
    assert model.unet.config.in_channels == 4 + ldm.LAYOUT_BITS
    z = torch.randn(2, 4, 8, 8)
    ids = ldm.tokenize(tok, ["<c1> a red square", ""], spec.max_tokens)
    layout = torch.randint(0, 255, (2, 8, 8), dtype=torch.uint8)
    out = model(z, torch.tensor([10, 500]), ids, layout)
    assert out.shape == z.shape
    spec2 = ldm.LdmSpec(unet="test", text="test", latent_size=8, conditions=["caption"])
    assert ldm.build_unet(spec2).config.in_channels == 4


def test_layout_planes_code_labels_and_zero_background():
    lay = torch.tensor([[[0, 1], [2, 255]]], dtype=torch.uint8)
    p = ldm.layout_planes(lay)
    assert p.shape == (1, ldm.LAYOUT_BITS, 2, 2)
    assert (p[0, :, 0, 0] == 0).all()
    assert p[0, 0, 0, 1] == 1 and (p[0, 1:, 0, 1] == -1).all()     # 1 = 0b00000001
    assert p[0, 1, 1, 0] == 1 and p[0, 0, 1, 0] == -1               # 2 = 0b00000010
    assert (p[0, :, 1, 1] == 1).all()                               # 255 = all bits


def test_drop_conditions_rate_and_content():
    ids = torch.full((4000, 5), 7)
    null = torch.tensor([2, 3, 0, 0, 0])
    lay = torch.ones(4000, 2, 2, dtype=torch.uint8)
    out, lay2 = ldm.drop_conditions(ids, lay, null, 0.1, torch.Generator().manual_seed(0))
    dropped = (out == null).all(1)
    assert 0.08 < dropped.float().mean() < 0.12
    assert (lay2[dropped] == 0).all() and (lay2[~dropped] == 1).all()


def test_loss_falls_on_a_fixed_batch(tok):
    torch.manual_seed(0)
    spec = ldm.LdmSpec(unet="test", text="test", latent_size=8)
    model = ldm.LatentDiffusion(spec, tok)
    sched = ldm.build_noise_scheduler(spec)
    z = torch.randn(4, 4, 8, 8)
    ids = ldm.tokenize(tok, ["<c1> a red square"] * 4, spec.max_tokens)
    lay = torch.zeros(4, 8, 8, dtype=torch.uint8)
    noise, t = torch.randn_like(z), torch.tensor([50, 300, 600, 900])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = ldm.diffusion_loss(model, z, ids, lay, sched, noise=noise, timesteps=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_ema_tracks_with_warmup(tok):
    a = torch.nn.Linear(2, 2)
    b = torch.nn.Linear(2, 2)
    with torch.no_grad():
        b.weight.fill_(1.0)
    ldm.ema_update(a, b, step=0, decay=0.999)  # warm-up decay 0.1: mostly the new weights
    assert torch.allclose(a.weight, torch.full((2, 2), 1.0), atol=0.2)


def test_ddim_sampling_with_guidance_shapes(tok):
    spec = ldm.LdmSpec(unet="test", text="test", latent_size=8)
    model = ldm.LatentDiffusion(spec, tok).eval()
    ids = ldm.tokenize(tok, ["<c1>", "<c2>"], spec.max_tokens)
    z1 = ldm.ddim_sample(model, ids, None, steps=3, guidance=3.0,
                         generator=torch.Generator().manual_seed(0))
    z2 = ldm.ddim_sample(model, ids, None, steps=3, guidance=3.0,
                         generator=torch.Generator().manual_seed(0))
    assert z1.shape == (2, 4, 8, 8) and torch.equal(z1, z2)


def test_export_loads_into_diffusers_pipelines(tok, tmp_path):
    from diffusers import StableDiffusionPipeline

    vae = ldm.build_vae("test-f4")
    plain = ldm.LatentDiffusion(ldm.LdmSpec(unet="test", text="test", latent_size=8,
                                            conditions=["class", "caption"]), tok)
    ldm.export_pipeline(str(tmp_path / "plain"), plain, vae, tok)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "plain"))
    img = pipe("<c1> a red square", num_inference_steps=2, guidance_scale=2.0, height=32,
               width=32, output_type="np").images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    model, vae2, tok2 = ldm.load_exported(str(tmp_path / "plain"))
    assert all(torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(),
                                                 plain.unet.state_dict().values()))

    layout_model = ldm.LatentDiffusion(ldm.LdmSpec(unet="test", text="test", latent_size=8), tok)
    ldm.export_pipeline(str(tmp_path / "layout"), layout_model, vae, tok)
    pipe = ldm.LayoutDiffusionPipeline.from_pretrained(str(tmp_path / "layout"))
    out = pipe(["<c1>", "<c2>"], layout=np.ones((8, 8), np.uint8), num_inference_steps=2,
               output_type="np")
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8


def test_load_vae_from_folder_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    vae = ldm.build_vae("test-f4")
    vae.save_pretrained(tmp_path / "folder")
    a = ldm.load_vae(str(tmp_path / "folder"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              str(tmp_path / "vae.safetensors"))
    b = ldm.load_vae(str(tmp_path / "vae.safetensors"), "test-f4")
    for m in (a, b):
        assert all(torch.equal(x, y) for x, y in zip(m.state_dict().values(),
                                                     vae.state_dict().values()))
    with pytest.raises(ValueError, match="registry config"):
        ldm.load_vae(str(tmp_path / "vae.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        ldm.load_vae(str(tmp_path / "vae.safetensors"), "tiny-f4")
    with pytest.raises(FileNotFoundError):
        ldm.load_vae(str(tmp_path / "nothing"))
