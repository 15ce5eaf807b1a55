"""The training step's maths (REFERENCE.md, "The training step"), recomputed independently here with
upstream's own method: σ by a per-sample search of the scheduler's timesteps, noising by the scheduler's
add_noise, c_in = 1/sqrt(σ²+1), x̂₀ = pred·(−σ) + noisy, weight σ⁻²."""

import pytest
import torch

import train_t2i_adapter_sdxl as train
from helpers import RESOLUTION, training_argv

LATENT = RESOLUTION // 8


@pytest.fixture(scope="module")
def scheduler(tiny_sdxl):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_pretrained(tiny_sdxl, subfolder="scheduler")


def upstream_sigmas(noise_scheduler, timesteps, n_dim=4):
    """Upstream's get_sigmas: find each timestep's index in scheduler.timesteps, take scheduler.sigmas there."""
    sigmas = noise_scheduler.sigmas.to(dtype=torch.float32)
    schedule_timesteps = noise_scheduler.timesteps
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


def reference_loss(noise_scheduler, unet, adapter, latents, noise, timesteps, conditioning, prompt_embeds, added):
    """REFERENCE.md's step 3–5 for an epsilon model, written out as upstream does it."""
    sigmas = upstream_sigmas(noise_scheduler, timesteps)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    unet_input = noisy / ((sigmas**2 + 1) ** 0.5)
    residuals = list(adapter(conditioning))
    pred = unet(
        unet_input,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs=added,
        down_intrablock_additional_residuals=residuals,
        return_dict=False,
    )[0]
    denoised = pred * (-sigmas) + noisy
    weighing = sigmas**-2.0
    return torch.mean((weighing.float() * (denoised.float() - latents.float()) ** 2).reshape(latents.shape[0], -1), 1).mean()


class StandInAdapter(torch.nn.Module):
    """Two feature maps from the conditioning image, scaled by a learnable weight."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([0.7, -1.3]))

    def forward(self, x):
        return [x * self.weight[0], x.mean(dim=1, keepdim=True) * self.weight[1]]


class StandInUNet(torch.nn.Module):
    """A deterministic function of every input, residuals included; pops the residuals like the UNet and
    records what it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, down_intrablock_additional_residuals,
                return_dict=True):
        self.calls.append(
            {
                "sample": sample.detach().clone(),
                "timestep": timestep.clone(),
                "encoder_hidden_states": encoder_hidden_states,
                "added_cond_kwargs": dict(added_cond_kwargs),
                "residuals": [r.detach().clone() for r in down_intrablock_additional_residuals],
            }
        )
        b = sample.shape[0]
        residual_term = torch.zeros(b, dtype=sample.dtype)
        while down_intrablock_additional_residuals:
            residual = down_intrablock_additional_residuals.pop(0)
            residual_term = residual_term + (residual.reshape(b, -1) ** 2).mean(dim=1)
        pred = (
            0.5 * sample
            + 0.1 * torch.sin(3 * sample)
            + residual_term.reshape(b, 1, 1, 1)
            + encoder_hidden_states.mean(dim=(1, 2)).reshape(b, 1, 1, 1)
            + added_cond_kwargs["text_embeds"].mean(dim=1).reshape(b, 1, 1, 1)
            + added_cond_kwargs["time_ids"].sum(dim=1).reshape(b, 1, 1, 1) / 1000
            + timestep.to(sample.dtype).reshape(b, 1, 1, 1) / 1000
        )
        return (pred,)


def fixed_inputs(batch_size=3, seed=0, conditioning_side=16):
    generator = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch_size, 4, LATENT, LATENT, generator=generator),
        "noise": torch.randn(batch_size, 4, LATENT, LATENT, generator=generator),
        "conditioning": torch.rand(batch_size, 3, conditioning_side, conditioning_side, generator=generator),
        "prompt_embeds": torch.randn(batch_size, 77, 96, generator=generator),
        "added": {
            "text_embeds": torch.randn(batch_size, 32, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch_size, 1),
        },
    }


def call_loss(unet, adapter, inputs, scheduler, timesteps, prediction_type="epsilon", weight_dtype=torch.float32):
    return train.adapter_training_loss(
        unet,
        adapter,
        inputs["latents"],
        inputs["conditioning"],
        inputs["prompt_embeds"],
        inputs["added"],
        train.sigma_table(scheduler),
        prediction_type,
        weight_dtype,
        noise=inputs["noise"],
        timesteps=timesteps,
    )


def test_loss_with_stand_in_modules_matches_the_reference_formula(scheduler):
    """adapter_training_loss equals the upstream formula recomputed here, and the UNet stand-in received
    noisy/sqrt(σ²+1), the timesteps, the embeddings and the adapter's maps."""
    inputs = fixed_inputs()
    timesteps = torch.tensor([0, 421, 999])
    adapter, unet = StandInAdapter(), StandInUNet()
    loss = call_loss(unet, adapter, inputs, scheduler, timesteps)
    expected = reference_loss(
        scheduler, StandInUNet(), adapter, inputs["latents"], inputs["noise"], timesteps,
        inputs["conditioning"], inputs["prompt_embeds"], inputs["added"],
    )
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    (call,) = unet.calls
    sigmas = upstream_sigmas(scheduler, timesteps)
    noisy = scheduler.add_noise(inputs["latents"], inputs["noise"], timesteps)
    torch.testing.assert_close(call["sample"], noisy / (sigmas**2 + 1) ** 0.5)
    assert torch.equal(call["timestep"], timesteps)
    torch.testing.assert_close(call["encoder_hidden_states"], inputs["prompt_embeds"])
    torch.testing.assert_close(call["added_cond_kwargs"]["text_embeds"], inputs["added"]["text_embeds"])
    torch.testing.assert_close(call["added_cond_kwargs"]["time_ids"], inputs["added"]["time_ids"])
    expected_residuals = adapter(inputs["conditioning"])
    assert len(call["residuals"]) == len(expected_residuals)
    for got, want in zip(call["residuals"], expected_residuals):
        torch.testing.assert_close(got, want.detach())


def test_loss_depends_on_the_adapter_and_gives_it_gradients(scheduler):
    """The residual path matters: changing the adapter's weight changes the loss, and backward reaches it."""
    inputs = fixed_inputs(seed=1)
    timesteps = torch.tensor([5, 500, 990])
    adapter = StandInAdapter()
    loss = call_loss(StandInUNet(), adapter, inputs, scheduler, timesteps)
    loss.backward()
    assert adapter.weight.grad is not None and (adapter.weight.grad != 0).all()
    with torch.no_grad():
        adapter.weight.mul_(2)
    assert not torch.allclose(call_loss(StandInUNet(), adapter, inputs, scheduler, timesteps), loss.detach())


def test_low_precision_unet_input_is_noised_in_float32(scheduler):
    """With a bf16 weight dtype the noising is float32 (defect 17): the UNet gets the float32 result cast
    to bf16, and the loss itself is float32."""
    inputs = fixed_inputs(seed=2)
    timesteps = torch.tensor([3, 250, 800])
    unet = StandInUNet()
    loss = call_loss(unet, StandInAdapter(), inputs, scheduler, timesteps, weight_dtype=torch.bfloat16)
    assert loss.dtype == torch.float32
    (call,) = unet.calls
    assert call["sample"].dtype == torch.bfloat16
    sigmas = upstream_sigmas(scheduler, timesteps)
    noisy = scheduler.add_noise(inputs["latents"], inputs["noise"], timesteps)
    assert torch.equal(call["sample"], (noisy / (sigmas**2 + 1) ** 0.5).to(torch.bfloat16))
    assert all(r.dtype == torch.bfloat16 for r in call["residuals"])


@pytest.fixture(scope="module")
def tiny_models(tiny_sdxl, fill_data, tmp_path_factory):
    """The tiny model's components as the trainer loads them (load_models), with the derived adapter."""
    from accelerate.state import PartialState

    args = train.parse_args(training_argv(tiny_sdxl, fill_data, tmp_path_factory.mktemp("loss-out")))
    adapter_config = train.check_inputs(args)
    torch.manual_seed(0)
    PartialState()  # load_models logs through accelerate's logger, which needs a state (main() has one)
    try:
        components = train.load_models(args, adapter_config)
    finally:
        PartialState._reset_state()
    return {**vars(components), "scheduler": components.noise_scheduler}


def test_loss_with_real_tiny_unet_and_adapter_matches_the_reference_formula(tiny_models):
    """On the real tiny UNet and derived adapter, with given noise and timesteps, the loss equals the
    upstream formula (with the real EulerDiscreteScheduler's add_noise)."""
    inputs = fixed_inputs(batch_size=2, seed=3, conditioning_side=RESOLUTION)
    timesteps = torch.tensor([37, 912])
    unet, adapter, scheduler = tiny_models["unet"], tiny_models["adapter"], tiny_models["scheduler"]
    with torch.no_grad():
        loss = call_loss(unet, adapter, inputs, scheduler, timesteps)
        expected = reference_loss(
            scheduler, unet, adapter, inputs["latents"], inputs["noise"], timesteps,
            inputs["conditioning"], inputs["prompt_embeds"], inputs["added"],
        )
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_backward_reaches_only_the_adapter(tiny_models):
    """After load_models only the adapter trains: the loss's backward gives every adapter parameter a finite,
    non-zero gradient, and no UNet, VAE or text-encoder parameter requires or receives one."""
    inputs = fixed_inputs(batch_size=2, seed=4, conditioning_side=RESOLUTION)
    unet, adapter = tiny_models["unet"], tiny_models["adapter"]
    frozen = [unet, tiny_models["vae"], *tiny_models["text_encoders"]]
    for model in frozen:
        assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in adapter.parameters()) and adapter.training
    adapter.zero_grad(set_to_none=True)
    loss = call_loss(unet, adapter, inputs, tiny_models["scheduler"], torch.tensor([100, 600]))
    loss.backward()
    for name, parameter in adapter.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    for model in frozen:
        assert all(p.grad is None for p in model.parameters())
    adapter.zero_grad(set_to_none=True)


def test_sigma_table_equals_upstream_lookup_for_every_timestep(scheduler):
    """sigma_table(scheduler)[t] is upstream's per-sample σ for every t in 0..T−1."""
    T = scheduler.config.num_train_timesteps
    timesteps = torch.arange(T)
    table = train.sigma_table(scheduler)
    assert table.shape == (T,)
    torch.testing.assert_close(table[timesteps], upstream_sigmas(scheduler, timesteps, n_dim=1), rtol=0, atol=0)
    # σ grows with t (more noise later in the forward process).
    assert (table[1:] > table[:-1]).all()


def test_latents_plus_sigma_noise_equals_scheduler_add_noise(scheduler):
    """latents + σ_t·noise (what the loss uses) equals EulerDiscreteScheduler.add_noise for every t."""
    T = scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(T, 4, 2, 2, generator=generator)
    noise = torch.randn(T, 4, 2, 2, generator=generator)
    timesteps = torch.arange(T)
    sigmas = train.sigma_table(scheduler)[timesteps].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(latents + sigmas * noise, scheduler.add_noise(latents, noise, timesteps))


def test_sample_timesteps_range_and_dtype():
    """Timesteps are long integers in [0, T−1]."""
    for T in (1000, 10):
        t = train.sample_timesteps(5000, T, generator=torch.Generator().manual_seed(0))
        assert t.dtype == torch.long and t.shape == (5000,)
        assert int(t.min()) >= 0 and int(t.max()) <= T - 1


def test_sample_timesteps_follows_the_cubic_distribution():
    """t = floor((1 − u³)·T): P(t ≥ k) = P(u³ ≤ 1 − k/T) = (1 − k/T)^(1/3); e.g. P(t ≥ 500) = 0.5^(1/3) ≈ 0.794."""
    T, n = 1000, 400_000
    t = train.sample_timesteps(n, T, generator=torch.Generator().manual_seed(1))
    for k in (100, 500, 900, 990):
        expected = (1 - k / T) ** (1 / 3)
        observed = (t >= k).float().mean().item()
        assert abs(observed - expected) < 0.005, (k, observed, expected)
    # Skewed towards high (noisy) timesteps: far from uniform's 0.5.
    assert (t >= 500).float().mean().item() > 0.75


def test_sample_timesteps_exact_pmf_for_small_T():
    """For T = 10 the whole probability mass function matches (1 − k/T)^(1/3) − (1 − (k+1)/T)^(1/3)."""
    T, n = 10, 400_000
    t = train.sample_timesteps(n, T, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(t, minlength=T).float() / n
    for k in range(T):
        expected = (1 - k / T) ** (1 / 3) - max(0.0, 1 - (k + 1) / T) ** (1 / 3)
        assert abs(counts[k].item() - expected) < 0.005, (k, counts[k].item(), expected)


def clean_and_noise(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 4, 3, 3, generator=generator, dtype=torch.float64)
    eps = torch.randn(4, 4, 3, 3, generator=generator, dtype=torch.float64)
    sigmas = torch.tensor([0.03, 0.7, 3.0, 14.6], dtype=torch.float64).reshape(-1, 1, 1, 1)
    return x0, eps, sigmas


def test_predict_clean_latents_v_prediction_recovers_x0():
    """Given the true velocity v = α·ε − s·x₀ (α = 1/sqrt(1+σ²), s = σ/sqrt(1+σ²)), x̂₀ = x₀ (defect 16);
    the epsilon formula upstream applies to v does not."""
    x0, eps, sigmas = clean_and_noise()
    noisy = x0 + sigmas * eps
    alpha, s = 1 / (1 + sigmas**2) ** 0.5, sigmas / (1 + sigmas**2) ** 0.5
    v = alpha * eps - s * x0
    torch.testing.assert_close(train.predict_clean_latents(v, noisy, sigmas, "v_prediction"), x0)
    assert not torch.allclose(train.predict_clean_latents(v, noisy, sigmas, "epsilon"), x0, atol=1e-3)


def test_predict_clean_latents_epsilon_and_sample():
    """Epsilon: the true noise gives x₀ back; sample: the prediction is x₀ itself; others are refused."""
    x0, eps, sigmas = clean_and_noise(1)
    noisy = x0 + sigmas * eps
    torch.testing.assert_close(train.predict_clean_latents(eps, noisy, sigmas, "epsilon"), x0)
    torch.testing.assert_close(train.predict_clean_latents(x0, noisy, sigmas, "sample"), x0)
    with pytest.raises(ValueError, match="flow"):
        train.predict_clean_latents(eps, noisy, sigmas, "flow")


class OracleUNet(torch.nn.Module):
    """Predicts exactly the right target (noise or velocity) for the known clean latents and noise."""

    def __init__(self, latents, noise, sigmas, prediction_type):
        super().__init__()
        self.latents, self.noise, self.sigmas, self.prediction_type = latents, noise, sigmas, prediction_type

    def forward(self, sample, timestep, down_intrablock_additional_residuals, return_dict=True, **_):
        down_intrablock_additional_residuals.clear()
        if self.prediction_type == "epsilon":
            return (self.noise.clone(),)
        alpha = 1 / (1 + self.sigmas**2) ** 0.5
        s = self.sigmas / (1 + self.sigmas**2) ** 0.5
        return (alpha * self.noise - s * self.latents,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_perfect_model_has_zero_loss(scheduler, prediction_type):
    """A UNet that predicts the true noise (epsilon) or the true velocity (v-prediction) gets loss ≈ 0:
    both parameterisations train towards the right target."""
    inputs = fixed_inputs(seed=6)
    timesteps = torch.tensor([1, 300, 999])
    sigmas = upstream_sigmas(scheduler, timesteps)
    oracle = OracleUNet(inputs["latents"], inputs["noise"], sigmas, prediction_type)
    loss = call_loss(oracle, StandInAdapter(), inputs, scheduler, timesteps, prediction_type=prediction_type)
    assert loss.item() < 1e-8
    # And a wrong prediction is penalised.
    wrong = OracleUNet(inputs["latents"], -inputs["noise"], sigmas, prediction_type)
    assert call_loss(wrong, StandInAdapter(), inputs, scheduler, timesteps, prediction_type=prediction_type) > 0.1
