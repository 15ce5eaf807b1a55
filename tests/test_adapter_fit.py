"""The adapter derived from the UNet's and VAE's configs, and the check that an adapter's feature
maps fit where the UNet adds them: against upstream's hard-coded SDXL adapter and against real
forward passes of the tiny model."""

import json
import os

import pytest
import torch

import train_t2i_adapter_sdxl as train
from helpers import RESOLUTION

# Real SDXL base 1.0 (shared/README.md).
SDXL_UNET_CONFIG = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
}
SDXL_VAE_CONFIG = {"block_out_channels": (128, 256, 512, 512)}


# Upstream's hard-coded adapter.
UPSTREAM_ADAPTER = {
    "in_channels": 3,
    "channels": [320, 640, 1280, 1280],
    "num_res_blocks": 2,
    "downscale_factor": 16,
    "adapter_type": "full_adapter_xl",
}


def read_config(model, subfolder):
    with open(os.path.join(model, subfolder, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny_configs(tiny_sdxl):
    return read_config(tiny_sdxl, "unet"), read_config(tiny_sdxl, "vae")


@pytest.fixture(scope="module")
def tiny_unet(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").eval()


def unet_inputs(unet, batch_size, latent_side, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    text_embed_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.randn(batch_size, config.in_channels, latent_side, latent_side, generator=generator),
        "timestep": torch.tensor([10, 700][:batch_size]),
        "encoder_hidden_states": torch.randn(batch_size, 77, config.cross_attention_dim, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch_size, text_embed_dim, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch_size, 1),
        },
    }


def test_derived_adapter_for_real_sdxl_is_upstreams_adapter():
    """On SDXL's real configs the derived adapter is exactly upstream's hard-coded one."""
    config = train.derive_adapter_config(SDXL_UNET_CONFIG, SDXL_VAE_CONFIG)
    assert {**config, "channels": list(config["channels"])} == UPSTREAM_ADAPTER


def test_upstream_adapter_fits_real_sdxl_at_1024():
    """check_adapter_fits accepts upstream's adapter on SDXL at 1024² (and at other multiples of 32)."""
    for resolution in (1024, 512, 768, 1152):
        train.check_adapter_fits(UPSTREAM_ADAPTER, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, resolution)


def test_real_sdxl_shapes_at_1024():
    """At 1024² SDXL's latents are 128²; the adapter maps are 64, 64, 32, 32 at 320, 640, 1280, 1280 channels,
    and the UNet takes exactly those."""
    expected = [(320, 64), (640, 64), (1280, 32), (1280, 32)]
    assert train.adapter_feature_shapes(UPSTREAM_ADAPTER, 1024) == expected
    assert train.unet_residual_shapes(SDXL_UNET_CONFIG, 1024 // 8) == expected


def test_derived_adapter_on_tiny_model_makes_the_shapes_the_unet_takes(tiny_configs):
    """A T2IAdapter built from the derived config, run on a (2, 3, 64, 64) image, makes feature maps whose
    (channels, height) are what adapter_feature_shapes predicts and unet_residual_shapes requires."""
    from diffusers import T2IAdapter

    unet_config, vae_config = tiny_configs
    config = train.derive_adapter_config(unet_config, vae_config)
    assert list(config["channels"]) == list(unet_config["block_out_channels"]) + [unet_config["block_out_channels"][-1]]
    torch.manual_seed(0)
    adapter = T2IAdapter(**config)
    features = adapter(torch.rand(2, 3, RESOLUTION, RESOLUTION))
    measured = [(f.shape[1], f.shape[2]) for f in features]
    assert all(f.shape[0] == 2 and f.shape[2] == f.shape[3] for f in features)
    assert measured == train.adapter_feature_shapes(config, RESOLUTION)
    latent_side = RESOLUTION // 2 ** (len(vae_config["block_out_channels"]) - 1)
    assert measured == train.unet_residual_shapes(unet_config, latent_side)
    train.check_adapter_fits(config, unet_config, vae_config, RESOLUTION)


def test_tiny_unet_consumes_every_derived_adapter_residual_and_they_change_its_output(tiny_configs, tiny_unet):
    """A real forward of the tiny UNet with the adapter's maps as down_intrablock_additional_residuals pops
    all of them (the list is empty afterwards) and its output differs from the output without them."""
    from diffusers import T2IAdapter

    unet_config, vae_config = tiny_configs
    config = train.derive_adapter_config(unet_config, vae_config)
    torch.manual_seed(0)
    adapter = T2IAdapter(**config)
    with torch.no_grad():
        residuals = list(adapter(torch.rand(2, 3, RESOLUTION, RESOLUTION)))
        assert len(residuals) == len(config["channels"])
        inputs = unet_inputs(tiny_unet, 2, RESOLUTION // 8)
        with_adapter = tiny_unet(**inputs, down_intrablock_additional_residuals=residuals).sample
        assert residuals == [], f"{len(residuals)} residuals not consumed by the UNet"
        without = tiny_unet(**inputs).sample
    assert with_adapter.shape == without.shape
    assert not torch.allclose(with_adapter, without, atol=1e-5)


def test_adapter_without_mid_block_map_is_accepted_and_fully_consumed(tiny_configs, tiny_unet):
    """check_adapter_fits also accepts an adapter that stops after the down blocks; the UNet then consumes
    all of its maps too."""
    from diffusers import T2IAdapter

    unet_config, vae_config = tiny_configs
    config = train.derive_adapter_config(unet_config, vae_config)
    config["channels"] = list(config["channels"])[:-1]
    train.check_adapter_fits(config, unet_config, vae_config, RESOLUTION)
    torch.manual_seed(0)
    with torch.no_grad():
        residuals = list(T2IAdapter(**config)(torch.rand(2, 3, RESOLUTION, RESOLUTION)))
        tiny_unet(**unet_inputs(tiny_unet, 2, RESOLUTION // 8), down_intrablock_additional_residuals=residuals)
    assert residuals == []


def test_wrong_adapter_is_refused_naming_both_shapes(tiny_configs):
    """An adapter with the wrong channels is refused; the message gives the adapter's and the UNet's shapes."""
    unet_config, vae_config = tiny_configs
    wrong = {**train.derive_adapter_config(unet_config, vae_config), "channels": [16, 32, 64, 64]}
    adapter_shapes = train.adapter_feature_shapes(wrong, RESOLUTION)
    unet_shapes = train.unet_residual_shapes(unet_config, RESOLUTION // 8)
    assert adapter_shapes != unet_shapes
    with pytest.raises(ValueError) as error:
        train.check_adapter_fits(wrong, unet_config, vae_config, RESOLUTION)
    message = str(error.value)
    assert str(adapter_shapes) in message and str(unet_shapes) in message, message


def test_real_sdxl_adapter_does_not_fit_the_tiny_unet(tiny_configs):
    """Upstream's SDXL adapter on another UNet (upstream defect 9) is refused up front, not a crash mid-step."""
    unet_config, vae_config = tiny_configs
    with pytest.raises(ValueError, match="does not fit"):
        train.check_adapter_fits(UPSTREAM_ADAPTER, unet_config, vae_config, RESOLUTION)


def test_wrong_downscale_is_refused(tiny_configs):
    """An adapter whose downscale does not match the VAE's (8 instead of 16) makes maps of the wrong size."""
    unet_config, vae_config = tiny_configs
    wrong = {**train.derive_adapter_config(unet_config, vae_config), "downscale_factor": 8}
    with pytest.raises(ValueError, match="does not fit"):
        train.check_adapter_fits(wrong, unet_config, vae_config, RESOLUTION)


def test_resolution_not_divisible_by_total_downscale_is_refused():
    """At a resolution divisible by 8 but not by the adapter's total downscale (16 × 2 = 32) the check fails
    naming the resolution and the factor."""
    with pytest.raises(ValueError) as error:
        train.check_adapter_fits(UPSTREAM_ADAPTER, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, 1000)
    assert "--resolution" in str(error.value) and "1000" in str(error.value) and "32" in str(error.value)
