"""Model configs read without weights: the checks that the adapter fits the UNet, the adapter
derived from a UNet's config, and the real SDXL's configs (for planning and benchmarks)."""

import os
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open

from .stopping import Refusal

CONFIG_KEYS = {  # what the input checks read of each model's config
    "UNet2DConditionModel": ("block_out_channels", "down_block_types"),
    "AutoencoderKL": ("block_out_channels",),
    "T2IAdapter": ("channels", "downscale_factor", "adapter_type"),
}


def check_model_location(flag, value):
    """A local path must exist; anything else must at least look like a Hub repository id."""
    if value is None or os.path.isdir(value):
        return
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise Refusal(f"`{flag}` {value!r} is neither an existing folder nor a Hub repository id.") from None


def load_model_config(model_class, location, subfolder, args, flag):
    """Read only a model's config.json (no weights), and make sure it is a `model_class`'s config with
    the keys training reads (CONFIG_KEYS): a UNet given as the adapter, or an adapter as the base, is
    named as such."""
    where = f"{location}/{subfolder}" if subfolder else location
    try:
        config = dict(
            model_class.load_config(location, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir)
        )
    except Exception as error:
        raise Refusal(f"`{flag}` {location!r}: no {model_class.__name__} config found in {where} ({error}).") from None
    found = config.get("_class_name", model_class.__name__)
    missing = [key for key in CONFIG_KEYS[model_class.__name__] if key not in config]
    if found != model_class.__name__ or missing:
        lacking = f" (it has no {', '.join(missing)})" if missing else ""
        raise Refusal(f"`{flag}` {location!r}: {where} holds a {found} config, not a {model_class.__name__}'s{lacking}.")
    return config


def safetensors_dtypes(folder):
    """The dtypes of the weights `from_pretrained` loads from a local diffusers model folder (not
    variants such as diffusion_pytorch_model.fp16.safetensors), read from safetensors headers only."""
    dtypes = set()
    weight_files = [*Path(folder).glob("diffusion_pytorch_model.safetensors"),
                    *Path(folder).glob("diffusion_pytorch_model-*-of-*.safetensors")]
    for path in weight_files:
        with safe_open(str(path), framework="pt") as weights:
            dtypes.update(str(weights.get_slice(key).get_dtype()) for key in weights.keys())
    return dtypes


def vae_scale_factor(vae_config):
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def adapter_feature_shapes(adapter_config, resolution):
    """(channels, height) of each feature map the adapter makes from a resolution² image."""
    channels = list(adapter_config["channels"])
    side = resolution // adapter_config["downscale_factor"]
    if adapter_config["adapter_type"] == "full_adapter_xl":
        # Only the third block halves the resolution.
        return [(c, side if i < 2 else side // 2) for i, c in enumerate(channels)]
    if adapter_config["adapter_type"] == "light_adapter":
        channels.append(channels[-1])  # its last block makes one more map, at the last channels
    return [(c, side // 2**i) for i, c in enumerate(channels)]  # every block after the first halves it


def unet_residual_shapes(unet_config, latent_side):
    """(channels, height) of each place where the UNet adds an adapter feature map, in order.

    A cross-attention down block adds it before its downsampler; a plain down block after it;
    the mid block takes one more at the lowest resolution.
    """
    shapes = []
    block_types = unet_config["down_block_types"]
    side = latent_side
    for i, (block_type, channels) in enumerate(zip(block_types, unet_config["block_out_channels"])):
        has_downsampler = i < len(block_types) - 1
        if "CrossAttn" in block_type or not has_downsampler:
            shapes.append((channels, side))
        else:
            shapes.append((channels, side // 2))
        if has_downsampler:
            side //= 2
    shapes.append((unet_config["block_out_channels"][-1], side))  # mid block
    return shapes


def adapter_total_downscale(adapter_config):
    """How many condition pixels make one pixel of the adapter's smallest feature map (diffusers'
    `total_downscale_factor`): image sides must be multiples of it."""
    downscale, num_maps = adapter_config["downscale_factor"], len(adapter_config["channels"])
    halvings = {"full_adapter_xl": 1, "full_adapter": num_maps - 1, "light_adapter": num_maps}
    return downscale * 2 ** halvings[adapter_config["adapter_type"]]


def check_adapter_fits(adapter_config, unet_config, vae_config, resolution):
    """The adapter's feature maps must match, one by one, where the UNet adds them."""
    downscale = adapter_total_downscale(adapter_config)
    if resolution % downscale != 0:
        raise Refusal(
            f"`--resolution` {resolution} must be divisible by the adapter's total downscale factor {downscale}."
        )
    adapter_shapes = adapter_feature_shapes(adapter_config, resolution)
    unet_shapes = unet_residual_shapes(unet_config, resolution // vae_scale_factor(vae_config))
    # The mid-block map is optional: an adapter may stop after the down blocks.
    if adapter_shapes not in (unet_shapes, unet_shapes[:-1]):
        raise Refusal(
            "The adapter does not fit the UNet: at --resolution "
            f"{resolution} the adapter makes feature maps (channels, size) {adapter_shapes} but the UNet takes"
            f" {unet_shapes} (adapter channels {list(adapter_config['channels'])}, downscale"
            f" {adapter_config['downscale_factor']}, type {adapter_config['adapter_type']}; UNet block_out_channels"
            f" {list(unet_config['block_out_channels'])})."
        )


def derive_adapter_config(unet_config, vae_config):
    """A new adapter whose feature maps are, one by one, where this UNet adds them.

    Where that is depends on the UNet's down blocks (see unet_residual_shapes), and the adapter types
    differ in how their maps shrink: full_adapter_xl makes two maps of one size and then halves once
    (SDXL's three blocks), full_adapter halves at every map (SD 1.5's four blocks). So each type is
    tried, with the optional mid-block map first, at the UNet's channels, the pixels unshuffled so
    that the first map is as large as the UNet's first residual; the first that check_adapter_fits
    accepts is it. For SDXL that is upstream's hard-coded adapter: full_adapter_xl, channels
    (320, 640, 1280, 1280), downscale 16.
    """
    latent_side = 2 ** (len(unet_config["down_block_types"]) + 1)  # halves exactly at every block
    resolution = latent_side * vae_scale_factor(vae_config)
    unet_shapes = unet_residual_shapes(unet_config, latent_side)
    for shapes in (unet_shapes, unet_shapes[:-1]):  # with the mid-block map, else without
        for adapter_type in ("full_adapter_xl", "full_adapter"):
            config = {
                "in_channels": 3,
                "channels": [channels for channels, _ in shapes],
                "num_res_blocks": 2,
                "downscale_factor": resolution // unet_shapes[0][1],
                "adapter_type": adapter_type,
            }
            try:
                check_adapter_fits(config, unet_config, vae_config, resolution)
            except ValueError:
                continue
            return config
    raise Refusal(
        "No T2I-Adapter (full_adapter_xl or full_adapter) fits this UNet: its down_block_types"
        f" {list(unet_config['down_block_types'])} with block_out_channels {list(unet_config['block_out_channels'])}"
        f" take feature maps (channels, size) {unet_shapes} from {latent_side}² latents. Pass an adapter built for"
        " it (`--adapter_model_name_or_path`)."
    )

# The real SDXL base's architecture (shared/README.md), for planning and benchmarks without its weights.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    sample_size=1024, scaling_factor=0.13025,
)
# CLIP ViT-L and OpenCLIP ViT-bigG with its projection (CLIPTextConfig's defaults: 49408 tokens, 77 positions).
SDXL_TEXT_ENCODER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu")
SDXL_TEXT_ENCODER_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           projection_dim=1280, hidden_act="gelu")
