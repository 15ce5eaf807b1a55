"""Will it fit? The GPU memory of a training step, planned on any machine without a GPU.

The trainer's own step (its `set_up_models`, `build_training`, `batch_loss`, `optimisation_step`,
handed in as the `trainer` module) runs on fake tensors (`FakeTensorMode`): tensors with a shape, a
dtype and a device but no memory, so the real SDXL runs in seconds on a CPU. A dispatch mode counts
the bytes of every tensor an op allocates until the tensor is freed, and notes the peak and the phase
of the step it falls in (the VAE encode, the text encoders, the adapter and UNet forward, the
backward, the optimizer step). The step counted is a step after the first (the steady state): the
optimizer's state, which step 1 makes, is made first by one update, and held through the step.
What is modelled and what is not: scripts/plan_memory.py's --help.
"""

import argparse
import collections
import contextlib
import sys
import time
import types
import unittest.mock
import weakref

import torch
import transformers
from accelerate.logging import get_logger
from accelerate.utils import convert_outputs_to_fp32
from diffusers import AutoencoderKL, EulerDiscreteScheduler, T2IAdapter, UNet2DConditionModel
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from . import configs, flops, loader

logger = get_logger(__name__)

CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator hands out multiples of 512 bytes
BNB_BLOCK = 256  # values per float32 scale in bitsandbytes' blockwise 8-bit optimizer states
BNB_MIN_8BIT_SIZE = 4096  # smaller tensors keep float32 states in bitsandbytes' optimizers
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def rounded(nbytes, block):
    return -(-nbytes // block) * block


class MemoryCounter(TorchDispatchMode):
    """Live bytes of the tensors that ops allocate while the counter is active, their peak, and the
    phase (`counter.phase`, set by the caller) in which the peak falls.

    A storage counts from the op that makes it until it is freed (a weakref finalizer on the storage).
    An output that shares its storage with an input of the op (a view, an in-place op) allocates
    nothing, so storages made before the counter started (the weights) are never counted.
    `snapshot()`, if given, is called at each new peak and its dict kept with the peak: what the live
    bytes were made of at that moment.

    It also adds up the FLOPs of the ops that do the arithmetic (`flops.op_flops`), in `flops`:
    {phase: {arithmetic: FLOPs}}, where the phase is `flop_phase` when set, else `phase`."""

    def __init__(self, block=1, snapshot=None):
        super().__init__()
        self.block, self.snapshot = block, snapshot
        self.live = {}  # storage key -> (weakref to the storage, bytes)
        self.bytes, self.peak, self.phase, self.peak_phase, self.peak_detail = 0, 0, "start", None, {}
        self.flop_phase, self.flops = None, collections.defaultdict(collections.Counter)

    def _freed(self, key, nbytes):
        if self.live.pop(key, None) is not None:
            self.bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        counted = flops.op_flops(func, args, kwargs, out)
        if counted is not None:
            self.flops[self.flop_phase or self.phase][counted[0]] += counted[1]
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self.live:
                continue
            nbytes = rounded(storage.nbytes(), self.block)
            self.live[key] = (weakref.finalize(storage, self._freed, key, nbytes), nbytes)
            self.bytes += nbytes
            if self.bytes > self.peak:
                self.peak, self.peak_phase = self.bytes, self.phase
                self.peak_detail = self.snapshot() if self.snapshot else {}
        return out

    def __exit__(self, *exc):
        for finalizer, _ in list(self.live.values()):
            finalizer.detach()  # tensors still alive after the count are no longer tracked
        return super().__exit__(*exc)


def storage_bytes(tensors, block):
    """Bytes of the distinct storages behind `tensors`."""
    seen = {}
    for tensor in tensors:
        if tensor is not None and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage._cdata] = rounded(storage.nbytes(), block)
    return sum(seen.values())


class PaddedTokenizer:
    """A stand-in for a CLIP tokenizer where only the shape of its output matters: every caption
    becomes `model_max_length` ids (what SDXL's tokenizers give with padding="max_length")."""

    def __init__(self, model_max_length, token_id):
        self.model_max_length, self.token_id = model_max_length, token_id

    def __call__(self, captions, max_length=None, **_):
        return types.SimpleNamespace(input_ids=torch.full((len(captions), max_length or self.model_max_length), self.token_id))


def model_configs(options, trainer, size=None):
    """{name: (class, config)} of the UNet, VAE, both text encoders and the adapter, plus the scheduler
    and tokenizers, for `size` "sdxl" (the real SDXL's configs) or a model folder's own configs."""
    if size in ("sdxl", "sdxl-narrow"):
        unet_config, vae_config = dict(configs.SDXL_UNET), dict(configs.SDXL_VAE)
        if size == "sdxl-narrow":  # a fifth of the widths: the same blocks, depths and 64-channel heads
            unet_config.update(block_out_channels=(64, 128, 256), attention_head_dim=(1, 2, 4))
        text = [(CLIPTextModel, CLIPTextConfig(**configs.SDXL_TEXT_ENCODER)),
                (CLIPTextModelWithProjection, CLIPTextConfig(**configs.SDXL_TEXT_ENCODER_2))]
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading", steps_offset=1)
        tokenizers = [PaddedTokenizer(config.max_position_embeddings, config.eos_token_id) for _, config in text]
    else:
        base, flag = options.pretrained_model_name_or_path, "--pretrained_model_name_or_path"
        hub = {"revision": options.revision, "cache_dir": options.cache_dir}
        unet_config = configs.load_model_config(UNet2DConditionModel, base, "unet", options, flag)
        if options.pretrained_vae_model_name_or_path is None:
            vae_config = configs.load_model_config(AutoencoderKL, base, "vae", options, flag)
        else:
            vae_config = configs.load_model_config(AutoencoderKL, options.pretrained_vae_model_name_or_path, None, options,
                                                 "--pretrained_vae_model_name_or_path")
        text = []
        for subfolder in ("text_encoder", "text_encoder_2"):
            model_class = trainer.text_encoder_class(base, subfolder, options)
            text.append((model_class, transformers.AutoConfig.from_pretrained(base, subfolder=subfolder, **hub)))
        scheduler = EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", **hub)
        tokenizers = trainer.load_tokenizers(options)
    if options.adapter_model_name_or_path:
        adapter_config = configs.load_model_config(T2IAdapter, options.adapter_model_name_or_path, None, options,
                                                 "--adapter_model_name_or_path")
    else:
        adapter_config = configs.derive_adapter_config(unet_config, vae_config)
    models = {
        "unet": (UNet2DConditionModel, unet_config), "vae": (AutoencoderKL, vae_config),
        "text_encoder": text[0], "text_encoder_2": text[1], "adapter": (T2IAdapter, adapter_config),
    }
    return models, scheduler, tokenizers


def build_on_meta(model_class, config):
    """A model with no memory: built on the meta device from its config, in eval mode as
    `from_pretrained` returns it."""
    with torch.device("meta"):
        if isinstance(config, dict):
            model = model_class.from_config(config)
        else:
            model = model_class(config)
    return model.eval()


def materialise(model, fake):
    """The meta model on the CPU, dtypes kept: fake under FakeTensorMode, else real and zeroed (the
    values do not change what a step allocates)."""
    model.to_empty(device="cpu")
    if not fake:
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                tensor.zero_()
    return model


class PlanningAccelerator:
    """What the trainer's functions use of accelerate's Accelerator, for one process. `prepare` does
    to the adapter what accelerate's does under mixed precision: its forward runs in autocast and its
    outputs are cast back to float32."""

    num_processes, process_index, is_main_process, sync_gradients = 1, 0, True, True

    def __init__(self, mixed_precision, device, trainer):
        self.mixed_precision, self.device = mixed_precision, device
        self.weight_dtype = trainer.weight_dtype_for(mixed_precision)
        self.state = types.SimpleNamespace(deepspeed_plugin=None)

    def register_save_state_pre_hook(self, hook):
        pass

    register_load_state_pre_hook = register_save_state_pre_hook

    def prepare(self, adapter, optimizer, lr_scheduler):
        if self.mixed_precision in ("fp16", "bf16"):
            autocast = torch.autocast(self.device.type, dtype=self.weight_dtype)
            adapter.forward = convert_outputs_to_fp32(autocast(adapter.forward))
        return adapter, optimizer, lr_scheduler

    def backward(self, loss):
        loss.backward()

    def reduce(self, tensor, reduction="mean"):
        return types.SimpleNamespace(item=lambda: 0.0)  # fake tensors have no values: a finite stand-in loss

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class ModelledAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' AdamW8bit as far as memory goes: its state tensors at their sizes, and an update in
    place (its fused kernel dequantises in registers). Not an optimizer to train with."""

    def __init__(self, params, lr=1e-3, **_):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    if param.numel() >= BNB_MIN_8BIT_SIZE:
                        blocks = -(-param.numel() // BNB_BLOCK)
                        for name in ("state1", "state2"):
                            state[name] = torch.zeros_like(param, dtype=torch.uint8)
                        for name in ("absmax1", "absmax2"):
                            state[name] = torch.zeros(blocks, dtype=torch.float32, device=param.device)
                    else:
                        state["state1"], state["state2"] = torch.zeros_like(param), torch.zeros_like(param)
                param.add_(param.grad, alpha=-group["lr"])


@contextlib.contextmanager
def modelled_bitsandbytes():
    """`import bitsandbytes` gives the modelled AdamW8bit while planning."""
    module = types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=ModelledAdamW8bit))
    with unittest.mock.patch.dict(sys.modules, {"bitsandbytes": module}):
        yield


class PhaseHooks:
    """The trainer's own hooks, with the counter told which phase the step is in."""

    def __init__(self, counter, hooks):
        self.counter, self.hooks = counter, hooks

    def encode_prompt(self, captions, components):
        self.counter.phase = "text encoders"
        return self.hooks.encode_prompt(captions, components)

    def training_loss(self, *loss_arguments):
        self.counter.phase = "adapter+UNet forward"
        return self.hooks.training_loss(*loss_arguments)


class HandOverBatch(dict):
    """A batch as the device sees it: the trainer's device copy of the pixel values lives only while
    the VAE encodes them (the loader's batch stays in host memory)."""

    def __getitem__(self, key):
        return self.pop(key) if key == "pixel_values" else super().__getitem__(key)


def make_batch(options, latent_channels, vae_downscale):
    """One batch as the loader yields it (float32), placed on the device."""
    size, side = options.train_batch_size, options.resolution
    batch = HandOverBatch(
        conditioning_pixel_values=torch.zeros(size, 3, side, side),
        captions=["a caption"] * size,
        seed=list(range(size)),
        original_sizes=torch.full((size, 2), float(side)),
        crop_top_lefts=torch.zeros(size, 2),
    )
    if options.cache_latents:
        latent_side = side // vae_downscale
        batch["latent_mean"] = torch.zeros(size, latent_channels, latent_side, latent_side)
        batch["latent_std"] = torch.ones(size, latent_channels, latent_side, latent_side)
    else:
        batch["pixel_values"] = torch.zeros(size, 3, side, side)
    return batch
COMPONENT_NAMES = {"unet": "UNet", "text_encoder": "text encoder 1", "text_encoder_2": "text encoder 2",
                   "vae": "VAE", "adapter": "adapter", "ema": "adapter EMA"}


# The phases of a step as the FLOP plan names them (the step-1 state is not part of a step's arithmetic).
FLOP_PHASES = {"batch and VAE encode": "VAE encode", "text encoders": "text encoders",
               "adapter forward": "adapter forward", "adapter+UNet forward": "UNet forward",
               "backward": "backward (UNet and adapter)", "optimizer step": "optimizer step"}


def plan_memory(options, trainer, size=None, device_type="cuda", fake=True, unet_grads=False):
    """Run a training step of the trainer's code, as a step after the first, on fake tensors (or, with
    fake=False, on real ones on the CPU) and return what it holds: weights by component, gradients, optimizer state and
    the peak of everything, with the phase it falls in and what it is made of; and its FLOPs by phase
    and arithmetic. `unet_grads` leaves the UNet trainable, as upstream does (its weights get gradients
    that nothing uses)."""
    # Planned as eager PyTorch attention: torch.compile and xformers kernels cannot run on fake CPU tensors.
    options = argparse.Namespace(**{**vars(options), "torch_compile": False,
                                    "enable_xformers_memory_efficient_attention": False})
    block = CUDA_BLOCK_BYTES if device_type == "cuda" else 1
    models, scheduler, tokenizers = model_configs(options, trainer, size)
    built = {name: build_on_meta(*spec) for name, spec in models.items()}
    components = trainer.Models(scheduler, tokenizers, [built["text_encoder"], built["text_encoder_2"]], built["vae"],
                                built["unet"], built["adapter"])
    components.adapter.requires_grad_(True).train()
    for model in (*components.text_encoders, components.vae):
        model.requires_grad_(False)
    components.unet.requires_grad_(unet_grads)
    # The trainer's placement and dtypes, free on the meta device; then each model made fake or real.
    weight_dtype = trainer.set_up_models(components, options, PlanningAccelerator(options.mixed_precision, torch.device("meta"), trainer))
    accelerator = PlanningAccelerator(options.mixed_precision, torch.device("cpu"), trainer)
    sigmas = components.sigmas_by_timestep
    on_device = {"unet": components.unet, "text_encoder": components.text_encoders[0],
                 "text_encoder_2": components.text_encoders[1], "adapter": components.adapter}
    if not options.cache_latents:  # with the latent cache the trainer moves the VAE off the GPU
        on_device["vae"] = components.vae

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    bits = modelled_bitsandbytes() if options.use_8bit_adam else contextlib.nullcontext()
    started = time.perf_counter()
    with mode, bits:
        for model in on_device.values():
            materialise(model, fake)
        adapter_params = list(components.adapter.parameters())
        weights = {name: storage_bytes([*m.parameters(), *m.buffers()], block) for name, m in on_device.items()}
        dtypes = {name: next(m.parameters()).dtype for name, m in on_device.items()}
        if options.use_ema and not options.ema_on_cpu:  # the EMA: a float32 copy of the adapter, held throughout
            averaged = [torch.empty_like(param, dtype=torch.float32) for param in adapter_params]
            weights["ema"], dtypes["ema"] = storage_bytes(averaged, block), torch.float32
        adapter, optimizer, lr_scheduler = trainer.build_training(components.adapter, options, accelerator, 10)

        def optimizer_state():
            return storage_bytes([t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)], block)

        def snapshot():
            return {"gradients": storage_bytes([p.grad for p in adapter_params], block),
                    "optimizer state": optimizer_state()}

        counter = MemoryCounter(block, snapshot)
        gradients = 0

        def update_begins(optimizer, args, kwargs):
            """optimisation_step runs the backward and the update: the phase changes at the update."""
            nonlocal gradients
            gradients = max(gradients, snapshot()["gradients"])
            counter.phase = counter.phase.replace("backward", "optimizer step")

        optimizer.register_step_pre_hook(update_begins)
        adapter_hooks = [  # the adapter's forward is counted apart from the UNet's, which it runs just before
            components.adapter.register_forward_pre_hook(lambda *_: setattr(counter, "flop_phase", "adapter forward")),
            components.adapter.register_forward_hook(lambda *_: setattr(counter, "flop_phase", None)),
        ]
        with counter:
            # The state step 1 leaves: the optimizer's state made by one update (on zero gradients), and
            # the gradients zeroed or freed as optimisation_step leaves them. Then a whole step.
            counter.phase = "state left by step 1"
            for param in adapter_params:
                param.grad = torch.zeros_like(param)
            optimizer.step()
            optimizer.zero_grad(set_to_none=options.set_grads_to_none)
            counter.phase = "batch and VAE encode"
            batch = make_batch(options, components.vae.config.latent_channels,
                               configs.vae_scale_factor(components.vae.config))
            loss = trainer.batch_loss(batch, components, adapter, sigmas, options, weight_dtype, accelerator.device,
                                    PhaseHooks(counter, trainer.RunHooks()))
            del batch
            counter.phase = "backward"
            trainer.optimisation_step(loss, adapter, optimizer, lr_scheduler, accelerator, trainer.StepLosses("cpu"), 1, options)
            del loss
        for hook in adapter_hooks:
            hook.remove()
        state = optimizer_state()
    seconds = time.perf_counter() - started
    weights_total = sum(weights.values())
    detail = counter.peak_detail
    return {
        "weights": {COMPONENT_NAMES[name]: value for name, value in weights.items()},
        "weight_dtypes": {COMPONENT_NAMES[name]: DTYPE_NAMES.get(dtype, "?") for name, dtype in dtypes.items()},
        "weights_total": weights_total,
        "gradients": gradients,
        "optimizer_state": state,
        "activations_at_peak": counter.peak - detail.get("gradients", 0) - detail.get("optimizer state", 0),
        "gradients_at_peak": detail.get("gradients", 0),
        "optimizer_state_at_peak": detail.get("optimizer state", 0),
        "step_peak": counter.peak,
        "peak": weights_total + counter.peak,
        "peak_phase": counter.peak_phase,
        "seconds": seconds,
        "fake": fake,
        "flops": step_flops(counter.flops, sum(param.numel() for param in adapter_params)),
    }


def step_flops(counted, adapter_parameters):
    """{FLOP_PHASES name: {arithmetic: FLOPs}} of a counted step, the optimizer's update added."""
    by_phase = {FLOP_PHASES[phase]: dict(kinds) for phase, kinds in counted.items() if phase in FLOP_PHASES}
    by_phase.setdefault("optimizer step", {})
    by_phase["optimizer step"].update(flops.optimizer_flops(adapter_parameters))
    return by_phase


def fitting_changes(options, free_bytes, plan):
    """[(the flags that change, planned peak)] for changes to `options` that would fit in `free_bytes`,
    first one change at a time (gradient checkpointing, 8-bit Adam, the latent cache), then gradient
    checkpointing with a smaller batch and more accumulation (the same batch per optimisation step)."""
    changes = []
    if not options.gradient_checkpointing:
        changes.append(({"gradient_checkpointing": True}, "--gradient_checkpointing"))
    if not options.use_8bit_adam:
        changes.append(({"use_8bit_adam": True}, "--use_8bit_adam"))
    if not options.cache_latents and not loader.latent_cache_conflicts(options):
        changes.append(({"cache_latents": True}, "--cache_latents"))
    batch, accumulation = options.train_batch_size, options.gradient_accumulation_steps
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        flags = f"--train_batch_size {batch} --gradient_accumulation_steps {accumulation}"
        changes.append(({"gradient_checkpointing": True, "train_batch_size": batch,
                         "gradient_accumulation_steps": accumulation},
                        ("--gradient_checkpointing " if not options.gradient_checkpointing else "") + flags))
    fitting = []
    for change, flags in changes:
        planned = plan(argparse.Namespace(**{**vars(options), **change}))["peak"]
        if planned <= free_bytes:
            fitting.append((flags, planned))
            if "train_batch_size" in change:
                break  # the largest batch that fits
    return fitting


def memory_check_message(planned_bytes, free_bytes, fitting):
    """None when a step's planned peak fits in the device's free memory; else why the run stops, with
    both figures and the flag changes planned to fit (`fitting`: [(flags, planned bytes)])."""
    if planned_bytes <= free_bytes:
        return None
    gib = 2**30
    message = (
        f"This run will not fit: a training step is planned to peak at {planned_bytes / gib:.1f} GiB of GPU memory,"
        f" and {free_bytes / gib:.1f} GiB are free on this GPU."
    )
    if fitting:
        message += " Planned to fit: " + "; ".join(f"{flags} ({planned / gib:.1f} GiB)" for flags, planned in fitting) + "."
    else:
        message += (
            " Nothing planned fits, not even --gradient_checkpointing with a batch of 1: use a GPU with more memory"
            " or a lower --resolution."
        )
    return message + (
        " The breakdown: `python scripts/plan_memory.py` with these flags. The plan leaves out the CUDA context"
        " and cuDNN's workspaces; pass --skip_memory_check to train anyway."
    )


def check_memory_fits(args, accelerator, trainer):
    """On CUDA, before any model loads, stop a run whose planned peak (a step of the `trainer` on fake
    tensors, no memory used) exceeds the GPU's free memory, naming the flags that would fit. Skipped on
    other devices and with --skip_memory_check."""
    if accelerator.device.type != "cuda" or args.skip_memory_check:
        return
    free_bytes = torch.cuda.mem_get_info(accelerator.device)[0]
    plan = plan_memory(args, trainer)
    logger.info(f"Planned peak of a training step: {plan['peak'] / 2**30:.1f} GiB ({plan['peak_phase']});"
                f" {free_bytes / 2**30:.1f} GiB free on {accelerator.device}.")
    if plan["peak"] > free_bytes:
        logger.info("It will not fit: planning changes that would (each plan takes seconds to a minute).")
        fitting = fitting_changes(args, free_bytes, lambda changed: plan_memory(changed, trainer))
        raise MemoryError(memory_check_message(plan["peak"], free_bytes, fitting))
