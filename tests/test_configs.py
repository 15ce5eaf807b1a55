"""The adapter derived from the UNet's and VAE's configs, and the check that an adapter's feature
maps fit where the UNet adds them: against upstream's hard-coded SDXL adapter, against real
forward passes of the tiny model, and for UNets with two, three and four down blocks."""

import itertools
import json
import os

import pytest
import torch

from helpers import RESOLUTION
from t2i_train import configs

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


# SD 1.5's UNet, and diffusers' default T2IAdapter, which is made for it.
SD15_UNET_CONFIG = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
}
SD15_ADAPTER = {
    "in_channels": 3,
    "channels": [320, 640, 1280, 1280],
    "num_res_blocks": 2,
    "downscale_factor": 8,
    "adapter_type": "full_adapter",
}

# Tiny UNets with two, three and four down blocks: (down_block_types, block_out_channels, whether they take
# SDXL's text_time conditioning), and the (adapter_type, channels, downscale_factor) derived for them.
LAYOUTS = {
    "2 blocks, as diffusers' tiny SDXL test pipelines": (
        ("DownBlock2D", "CrossAttnDownBlock2D"), (32, 64), True, ("full_adapter_xl", [32, 64], 16),
    ),
    "3 blocks, as SDXL": (
        ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), (32, 64, 64), True,
        ("full_adapter_xl", [32, 64, 64, 64], 16),
    ),
    "4 blocks, as SD 1.5": (
        ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), (32, 32, 64, 64), False,
        ("full_adapter", [32, 32, 64, 64], 8),
    ),
}

# Three cross-attention blocks after a plain one: the last two residuals halve, which no adapter type makes.
UNFITTABLE_UNET_CONFIG = {
    "block_out_channels": (32, 32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
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
    """Random inputs for a UNet; SDXL's added text and time conditioning where it takes them."""
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    inputs = {
        "sample": torch.randn(batch_size, config.in_channels, latent_side, latent_side, generator=generator),
        "timestep": torch.tensor([10, 700][:batch_size]),
        "encoder_hidden_states": torch.randn(batch_size, 77, config.cross_attention_dim, generator=generator),
    }
    if config.addition_embed_type == "text_time":
        text_embed_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch_size, text_embed_dim, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch_size, 1),
        }
    return inputs


def tiny_unet_with(down_block_types, block_out_channels, text_time, seed=0):
    """A tiny random UNet with these down blocks (the up blocks mirror them); SDXL's added text and time
    conditioning when text_time, else none, like SD 1.5."""
    from diffusers import UNet2DConditionModel

    up_block_types = [block_type.replace("Down", "Up") for block_type in reversed(down_block_types)]
    sdxl_conditioning = {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
    }
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 8,
        down_block_types=down_block_types,
        up_block_types=up_block_types,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=32,
        norm_num_groups=8,
        **(sdxl_conditioning if text_time else {}),
    ).eval()


def test_derived_adapter_for_real_sdxl_is_upstreams_adapter():
    """On SDXL's real configs the derived adapter is exactly upstream's hard-coded one."""
    config = configs.derive_adapter_config(SDXL_UNET_CONFIG, SDXL_VAE_CONFIG)
    assert {**config, "channels": list(config["channels"])} == UPSTREAM_ADAPTER


def test_upstream_adapter_fits_real_sdxl_at_1024():
    """check_adapter_fits accepts upstream's adapter on SDXL at 1024² (and at other multiples of 32)."""
    for resolution in (1024, 512, 768, 1152):
        configs.check_adapter_fits(UPSTREAM_ADAPTER, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, resolution)


def test_real_sdxl_shapes_at_1024():
    """At 1024² SDXL's latents are 128²; the adapter maps are 64, 64, 32, 32 at 320, 640, 1280, 1280 channels,
    and the UNet takes exactly those."""
    expected = [(320, 64), (640, 64), (1280, 32), (1280, 32)]
    assert configs.adapter_feature_shapes(UPSTREAM_ADAPTER, 1024) == expected
    assert configs.unet_residual_shapes(SDXL_UNET_CONFIG, 1024 // 8) == expected


def test_derived_adapter_on_tiny_model_makes_the_shapes_the_unet_takes(tiny_configs):
    """A T2IAdapter built from the derived config, run on a (2, 3, 64, 64) image, makes feature maps whose
    (channels, height) are what adapter_feature_shapes predicts and unet_residual_shapes requires."""
    from diffusers import T2IAdapter

    unet_config, vae_config = tiny_configs
    config = configs.derive_adapter_config(unet_config, vae_config)
    assert list(config["channels"]) == list(unet_config["block_out_channels"]) + [unet_config["block_out_channels"][-1]]
    torch.manual_seed(0)
    adapter = T2IAdapter(**config)
    features = adapter(torch.rand(2, 3, RESOLUTION, RESOLUTION))
    measured = [(f.shape[1], f.shape[2]) for f in features]
    assert all(f.shape[0] == 2 and f.shape[2] == f.shape[3] for f in features)
    assert measured == configs.adapter_feature_shapes(config, RESOLUTION)
    latent_side = RESOLUTION // 2 ** (len(vae_config["block_out_channels"]) - 1)
    assert measured == configs.unet_residual_shapes(unet_config, latent_side)
    configs.check_adapter_fits(config, unet_config, vae_config, RESOLUTION)


def test_tiny_unet_consumes_every_derived_adapter_residual_and_they_change_its_output(tiny_configs, tiny_unet):
    """A real forward of the tiny UNet with the adapter's maps as down_intrablock_additional_residuals pops
    all of them (the list is empty afterwards) and its output differs from the output without them."""
    from diffusers import T2IAdapter

    unet_config, vae_config = tiny_configs
    config = configs.derive_adapter_config(unet_config, vae_config)
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
    config = configs.derive_adapter_config(unet_config, vae_config)
    config["channels"] = list(config["channels"])[:-1]
    configs.check_adapter_fits(config, unet_config, vae_config, RESOLUTION)
    torch.manual_seed(0)
    with torch.no_grad():
        residuals = list(T2IAdapter(**config)(torch.rand(2, 3, RESOLUTION, RESOLUTION)))
        tiny_unet(**unet_inputs(tiny_unet, 2, RESOLUTION // 8), down_intrablock_additional_residuals=residuals)
    assert residuals == []


def test_wrong_adapter_is_refused_naming_both_shapes(tiny_configs):
    """An adapter with the wrong channels is refused; the message gives the adapter's and the UNet's shapes."""
    unet_config, vae_config = tiny_configs
    wrong = {**configs.derive_adapter_config(unet_config, vae_config), "channels": [16, 32, 64, 64]}
    adapter_shapes = configs.adapter_feature_shapes(wrong, RESOLUTION)
    unet_shapes = configs.unet_residual_shapes(unet_config, RESOLUTION // 8)
    assert adapter_shapes != unet_shapes
    with pytest.raises(ValueError) as error:
        configs.check_adapter_fits(wrong, unet_config, vae_config, RESOLUTION)
    message = str(error.value)
    assert str(adapter_shapes) in message and str(unet_shapes) in message, message


def test_real_sdxl_adapter_does_not_fit_the_tiny_unet(tiny_configs):
    """Upstream's SDXL adapter on another UNet (upstream defect 9) is refused up front, not a crash mid-step."""
    unet_config, vae_config = tiny_configs
    with pytest.raises(ValueError, match="does not fit"):
        configs.check_adapter_fits(UPSTREAM_ADAPTER, unet_config, vae_config, RESOLUTION)


def test_wrong_downscale_is_refused(tiny_configs):
    """An adapter whose downscale does not match the VAE's (8 instead of 16) makes maps of the wrong size."""
    unet_config, vae_config = tiny_configs
    wrong = {**configs.derive_adapter_config(unet_config, vae_config), "downscale_factor": 8}
    with pytest.raises(ValueError, match="does not fit"):
        configs.check_adapter_fits(wrong, unet_config, vae_config, RESOLUTION)


def test_resolution_not_divisible_by_total_downscale_is_refused():
    """At a resolution divisible by 8 but not by the adapter's total downscale (16 × 2 = 32) the check fails
    naming the resolution and the factor."""
    with pytest.raises(ValueError) as error:
        configs.check_adapter_fits(UPSTREAM_ADAPTER, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, 1000)
    assert "--resolution" in str(error.value) and "1000" in str(error.value) and "32" in str(error.value)


def test_derived_adapter_for_real_sd15_is_diffusers_sd15_adapter():
    """On SD 1.5's UNet (four down blocks) the derived adapter is diffusers' default, SD 1.5's full_adapter: no
    mid-block map, the pixels unshuffled by the VAE's 8."""
    assert configs.derive_adapter_config(SD15_UNET_CONFIG, SDXL_VAE_CONFIG) == SD15_ADAPTER
    configs.check_adapter_fits(SD15_ADAPTER, SD15_UNET_CONFIG, SDXL_VAE_CONFIG, 512)


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_derived_adapter_fits_and_drives_a_unet_with_2_3_or_4_down_blocks(layout):
    """For a tiny UNet with two, three or four down blocks the derived adapter passes check_adapter_fits, and in
    a real forward the UNet consumes all of its maps, keeps its output shape, and its output changes."""
    from diffusers import T2IAdapter

    down_block_types, block_out_channels, text_time, expected = LAYOUTS[layout]
    unet = tiny_unet_with(down_block_types, block_out_channels, text_time)
    unet_config = dict(unet.config)
    config = configs.derive_adapter_config(unet_config, SDXL_VAE_CONFIG)
    assert (config["adapter_type"], config["channels"], config["downscale_factor"]) == expected
    configs.check_adapter_fits(config, unet_config, SDXL_VAE_CONFIG, RESOLUTION)
    torch.manual_seed(0)
    adapter = T2IAdapter(**config)
    with torch.no_grad():
        residuals = list(adapter(torch.rand(2, 3, RESOLUTION, RESOLUTION)))
        inputs = unet_inputs(unet, 2, RESOLUTION // 8)
        with_adapter = unet(**inputs, down_intrablock_additional_residuals=residuals).sample
        without = unet(**inputs).sample
    assert residuals == [], f"{len(residuals)} residuals not consumed by the UNet"
    assert with_adapter.shape == without.shape == inputs["sample"].shape
    assert not torch.allclose(with_adapter, without, atol=1e-5)


def fits(adapter_config, unet_config, resolution):
    try:
        configs.check_adapter_fits(adapter_config, unet_config, SDXL_VAE_CONFIG, resolution)
    except ValueError:
        return False
    return True


def test_derived_adapter_fits_every_unet_that_some_adapter_fits():
    """For every UNet of two to four plain or cross-attention down blocks: when any adapter (each type
    diffusers has, downscale 4 to 32, channels those of the UNet's first residuals) passes check_adapter_fits,
    the derived one passes it too; when none does, derivation refuses, naming the UNet's blocks and channels."""
    resolution = 512
    outcomes = []
    for num_blocks in (2, 3, 4):
        for down_block_types in itertools.product(("DownBlock2D", "CrossAttnDownBlock2D"), repeat=num_blocks):
            unet_config = {"down_block_types": down_block_types, "block_out_channels": (32, 48, 64, 80)[:num_blocks]}
            unet_shapes = configs.unet_residual_shapes(unet_config, resolution // 8)
            some_adapter_fits = any(
                fits(
                    {"in_channels": 3, "channels": [c for c, _ in unet_shapes[:k]], "num_res_blocks": 2,
                     "downscale_factor": downscale, "adapter_type": adapter_type},
                    unet_config,
                    resolution,
                )
                for adapter_type in ("full_adapter_xl", "full_adapter", "light_adapter")
                for downscale in (4, 8, 16, 32)
                for k in range(1, len(unet_shapes) + 1)
            )
            if some_adapter_fits:
                assert fits(configs.derive_adapter_config(unet_config, SDXL_VAE_CONFIG), unet_config, resolution)
            else:
                with pytest.raises(ValueError, match="No T2I-Adapter") as error:
                    configs.derive_adapter_config(unet_config, SDXL_VAE_CONFIG)
                message = str(error.value)
                assert str(list(down_block_types)) in message, message
                assert str(list(unet_config["block_out_channels"])) in message, message
            outcomes.append(some_adapter_fits)
    assert 0 < sum(outcomes) < len(outcomes)  # both cases occur


def test_unet_no_adapter_fits_is_refused_naming_its_blocks_and_channels():
    """A UNet whose residuals no adapter type makes gets a clear error, not an adapter the fit check refuses."""
    with pytest.raises(ValueError) as error:
        configs.derive_adapter_config(UNFITTABLE_UNET_CONFIG, SDXL_VAE_CONFIG)
    message = str(error.value)
    assert message.startswith("No T2I-Adapter (full_adapter_xl or full_adapter) fits this UNet"), message
    assert str(list(UNFITTABLE_UNET_CONFIG["down_block_types"])) in message, message
    assert str(list(UNFITTABLE_UNET_CONFIG["block_out_channels"])) in message, message


@pytest.mark.parametrize(
    "adapter_type, channels",
    [("full_adapter_xl", [8, 16, 32, 32]), ("full_adapter", [8, 16, 32, 32]), ("light_adapter", [8, 16, 32])],
)
def test_adapter_feature_shapes_are_what_each_adapter_type_makes(adapter_type, channels):
    """adapter_feature_shapes predicts the maps a real T2IAdapter of each type makes (a light_adapter makes one
    more map than it has channels)."""
    from diffusers import T2IAdapter

    config = {"in_channels": 3, "channels": channels, "num_res_blocks": 1, "downscale_factor": 8,
              "adapter_type": adapter_type}
    with torch.no_grad():
        features = T2IAdapter(**config)(torch.rand(1, 3, RESOLUTION, RESOLUTION))
    assert [(f.shape[1], f.shape[2]) for f in features] == configs.adapter_feature_shapes(config, RESOLUTION)
    assert configs.adapter_total_downscale(config) == T2IAdapter(**config).total_downscale_factor
