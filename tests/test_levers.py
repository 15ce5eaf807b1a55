"""Levers for an adapter that does not learn (#26): where the timesteps are drawn, and min-SNR-γ weighting.
Each defaults to upstream's maths; each is checked here against a formula written out independently."""

import math

import pytest
import torch

import train_t2i_adapter_sdxl as train
from helpers import run_training, training_argv
from t2i_train.stopping import Refusal

T = 1000
N = 400_000


def draw(kind="cubic", low=0, high=None, seed=0, **logit):
    return train.sample_timesteps(N, T, generator=torch.Generator().manual_seed(seed),
                                  sampling=train.TimestepSampling(kind, low, high, **logit))


def test_the_default_sampling_is_upstreams_cubic_draw_to_the_bit():
    generator = torch.Generator().manual_seed(3)
    u = torch.rand((N,), generator=generator)
    upstream = ((1 - u**3) * T).long().clamp(0, T - 1)
    assert torch.equal(train.sample_timesteps(N, T, generator=torch.Generator().manual_seed(3)), upstream)
    assert torch.equal(draw("cubic", 0, T, seed=3), upstream)


def test_uniform_sampling_gives_every_timestep_alike():
    counts = torch.bincount(draw("uniform"), minlength=T).float() / N
    assert counts.min() > 0.7 / T and counts.max() < 1.3 / T


def test_a_range_holds_the_draws_and_keeps_the_cubic_shape_inside_it():
    """t = 500 + (1 − u³)·500: P(t ≥ k) = (1 − (k − 500)/500)^(1/3) within [500, 1000), nothing outside."""
    t = draw("cubic", 500, 1000)
    assert int(t.min()) == 500 and int(t.max()) == 999
    for k in (550, 750, 950):
        assert abs((t >= k).float().mean().item() - (1 - (k - 500) / 500) ** (1 / 3)) < 0.005
    narrow = draw("uniform", 10, 12)
    assert set(narrow.unique().tolist()) == {10, 11}


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1.0, 0.5)])
def test_logit_normal_sampling_has_the_logistic_of_a_normal_as_its_fraction(mean, std):
    """t/T = sigmoid(n), n ~ N(mean, std): P(t < T·sigmoid(x)) = Φ((x − mean)/std)."""
    t = draw("logit_normal", logit_mean=mean, logit_std=std)
    for x in (-1.0, 0.0, 0.5, 1.5):
        expected = 0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2))))
        observed = (t < T / (1 + math.exp(-x))).float().mean().item()
        assert abs(observed - expected) < 0.005, (x, observed, expected)


def test_the_per_sample_draws_follow_the_sampling():
    """draw_sample_noise hands its sampling to every sample's draw: each timestep is the one that sample's
    seed gives alone, inside the range."""
    sampling = train.TimestepSampling("uniform", 700, 800)
    timesteps, _, _ = train.draw_sample_noise(range(64), (4, 2, 2), T, sampling)
    assert timesteps.min() >= 700 and timesteps.max() < 800
    alone = train.sample_timesteps(1, T, generator=torch.Generator().manual_seed(5), sampling=sampling)
    assert timesteps[5] == alone[0]


@pytest.mark.parametrize("flags,message", [
    (["--min_timestep", 600, "--max_timestep", 500], r"0 <= min < max <= 1000"),
    (["--max_timestep", 1001], r"`--max_timestep` 1001 must satisfy"),
    (["--min_timestep", -1], r"`--min_timestep` -1"),
    (["--logit_std", 0], r"`--logit_std` must be above 0"),
    (["--snr_gamma", 0], r"`--snr_gamma` must be above 0"),
    (["--timestep_sampling", "uniform", "--min_timestep", 1000], r"0 <= min < max <= 1000"),
])
def test_a_timestep_range_outside_the_schedule_is_refused_before_any_model_loads(tiny_sdxl, fill_data, tmp_path,
                                                                                 monkeypatch, flags, message):
    monkeypatch.setattr(train, "load_models", lambda *a: pytest.fail("models loaded before the refusal"))
    with pytest.raises(Refusal, match=message):
        run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "out", "--max_train_steps", 1, *flags))
    assert not (tmp_path / "out").exists()


def noised(prediction_type, seed=0):
    """(model prediction, noisy latents, σ, x₀, the true target, SNR from the scheduler's ᾱ) for an
    imperfect model: the true ε or v plus some error."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, prediction_type=prediction_type)
    timesteps = torch.tensor([5, 100, 400, 999])
    alphas_cumprod = scheduler.alphas_cumprod.double()[timesteps].reshape(-1, 1, 1, 1)
    snr = alphas_cumprod / (1 - alphas_cumprod)  # min-SNR's own definition, not through σ
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    generator = torch.Generator().manual_seed(seed)
    x0, eps, error = (torch.randn(4, 4, 3, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    noisy = x0 + sigmas * eps
    alpha, s = 1 / (1 + sigmas**2) ** 0.5, sigmas / (1 + sigmas**2) ** 0.5
    target = eps if prediction_type == "epsilon" else alpha * eps - s * x0
    return target + 0.1 * error, noisy, sigmas, x0, target, snr


@pytest.mark.parametrize("gamma", [None, 1.0, 5.0])
def test_min_snr_weighting_equals_the_papers_for_epsilon_and_v(gamma):
    """Against the paper's weights on the model's own target: ε's error by min(SNR, γ)/SNR, v's by
    min(SNR, γ)/(SNR + 1); without γ, ε's error unweighted (upstream's loss) and v's by SNR/(SNR + 1)."""
    for prediction_type, denominator in (("epsilon", lambda snr: snr), ("v_prediction", lambda snr: snr + 1)):
        prediction, noisy, sigmas, x0, target, snr = noised(prediction_type)
        clipped = snr if gamma is None else snr.clamp(max=gamma)
        oracle = (clipped / denominator(snr) * (prediction - target) ** 2).reshape(4, -1).mean(dim=1).mean()
        denoised = train.predict_clean_latents(prediction, noisy, sigmas, prediction_type)
        ours = train.weighted_denoising_loss(denoised, x0, sigmas, gamma)
        assert ours.item() == pytest.approx(oracle.item(), rel=1e-5), prediction_type
    # γ = 5 changes only the samples whose SNR is above it: the low-noise ones.
    _, _, sigmas, _, _, snr = noised("epsilon")
    assert (snr.flatten() > 5).tolist() == [True, True, False, False]


def test_a_run_draws_its_timesteps_in_the_range_and_weights_with_gamma(tiny_sdxl, fill_data, tmp_path):
    """Through the script: every timestep of 3 steps is in [500, 1000), drawn uniformly, and the loss gets the
    γ given; without the flags the loss gets upstream's γ (none)."""
    class Watch(train.RunHooks):
        def __init__(self):
            self.timesteps, self.gammas = [], []

        def training_loss(self, *arguments):
            *_, timesteps, snr_gamma = arguments
            self.timesteps.append(timesteps)
            self.gammas.append(snr_gamma)
            return super().training_loss(*arguments)

    hooks = Watch()
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "levers", "--max_train_steps", 3,
                               "--timestep_sampling", "uniform", "--min_timestep", 500, "--snr_gamma", 5), hooks)
    drawn = torch.cat(hooks.timesteps)
    assert len(drawn) == 12 and drawn.min() >= 500 and drawn.max() < 1000
    assert hooks.gammas == [5.0] * 3
    default = Watch()
    run_training(training_argv(tiny_sdxl, fill_data, tmp_path / "default", "--max_train_steps", 1), default)
    assert default.gammas == [None]


def test_the_model_card_states_the_timesteps_and_the_weighting_the_run_used(tiny_sdxl, fill_data, tmp_path):
    class Accelerator:
        num_processes, mixed_precision = 1, "no"

    def details(*flags):
        args = train.parse_args(training_argv(tiny_sdxl, fill_data, tmp_path, *flags))
        found = train.model_card_training_details(args, 10, Accelerator())
        return found["timesteps"], found["loss weighting"]

    assert details() == ("cubic over [0, T)", "SNR = σ⁻² on the x₀ error (upstream's)")
    assert details("--timestep_sampling", "logit_normal", "--logit_mean", 0.5, "--min_timestep", 500, "--snr_gamma", 5) \
        == ("logit_normal over [500, T), n ~ N(0.5, 1.0)", "min-SNR-γ, γ = 5.0")
