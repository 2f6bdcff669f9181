"""Tests for jax_diffusion.diffusion.GaussianDiffusion against an independent float64 reference.

The reference (class Ref) is written one timestep at a time with Python floats, straight from
the papers, and shares no code with the library:
- Ho et al. 2020: eq. 4  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I);
                  eq. 6-7 posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I),
                  mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
                        + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
                  beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t;
                  eq. 13 discretized decoder with bins of width 2/255 and open edge bins.
- Nichol & Dhariwal 2021: eq. 15 Sigma = exp(v log beta_t + (1 - v) log beta~_t) with the model
  output mapped to v in [0, 1] as (out + 1)/2; eq. 16 L_hybrid = L_simple + 0.001 L_vlb;
  sec. 4 respacing (abar kept at the kept steps).
- Salimans & Ho 2022: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0.
The discretized likelihood is computed with scipy.stats.norm. Indices follow the code: step i of
a K-step (possibly respaced) chain, i = 0..K-1, abar_{-1} = 1.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from jax_diffusion import diffusion as diffusion_lib
from jax_diffusion import schedules
from jax_diffusion.diffusion import GaussianDiffusion

LN2 = math.log(2.0)
BIN = 1.0 / 255.0  # half a bin of 8-bit data in [-1, 1]


@pytest.fixture
def x64():
    """Float64 JAX for the duration of one test, restored afterwards."""
    with jax.enable_x64(True):
        yield


# ============================================================================= reference
class Ref:
    """Float64 scalar reference for a (possibly respaced) Gaussian diffusion."""

    def __init__(self, betas_full, kept=None):
        abar_full = []
        prod = 1.0
        for beta in betas_full:  # abar_t = prod_{s <= t} (1 - beta_s)
            prod *= 1.0 - float(beta)
            abar_full.append(prod)
        self.abar_full = abar_full
        self.kept = list(range(len(abar_full))) if kept is None else sorted(kept)
        # Respacing: keep abar at the kept steps; beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}.
        self.abar = [abar_full[k] for k in self.kept]
        self.beta = []
        previous = 1.0
        for a in self.abar:
            self.beta.append(1.0 - a / previous)
            previous = a
        self.K = len(self.kept)

    def abar_prev(self, i):
        return 1.0 if i == 0 else self.abar[i - 1]

    def posterior_variance(self, i):
        # Ho et al. eq. 7: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
        return (1.0 - self.abar_prev(i)) / (1.0 - self.abar[i]) * self.beta[i]

    def posterior_log_variance_clipped(self, i):
        # improved-diffusion: beta~_0 = 0, so use beta~_1 at t = 0.
        return math.log(self.posterior_variance(1 if i == 0 else i))

    def coef_x0(self, i):
        # Ho et al. eq. 7, coefficient of x_0 in mu~_t
        return math.sqrt(self.abar_prev(i)) * self.beta[i] / (1.0 - self.abar[i])

    def coef_xt(self, i):
        # Ho et al. eq. 7, coefficient of x_t in mu~_t; alpha_t = 1 - beta_t
        return math.sqrt(1.0 - self.beta[i]) * (1.0 - self.abar_prev(i)) / (1.0 - self.abar[i])

    def q_sample(self, i, x0, noise):
        # Ho et al. eq. 4 (reparametrised)
        return math.sqrt(self.abar[i]) * x0 + math.sqrt(1.0 - self.abar[i]) * noise

    def posterior_mean(self, i, x0, xt):
        return self.coef_x0(i) * x0 + self.coef_xt(i) * xt

    def model_log_variance(self, i, var_type, out_v=None):
        if var_type == "fixed_small":
            return self.posterior_log_variance_clipped(i)
        if var_type == "fixed_large":
            # sigma_t^2 = beta_t, with beta~_1 at t = 0 (improved-diffusion)
            return math.log(self.posterior_variance(1) if i == 0 else self.beta[i])
        # learned_range, Nichol & Dhariwal eq. 15 with v = (out + 1) / 2
        frac = (out_v + 1.0) / 2.0
        return frac * math.log(self.beta[i]) + (1.0 - frac) * self.posterior_log_variance_clipped(i)

    def pred_x0(self, i, mean_type, xt, out):
        a = self.abar[i]
        if mean_type == "eps":  # invert Ho et al. eq. 4
            return (xt - math.sqrt(1.0 - a) * out) / math.sqrt(a)
        if mean_type == "x0":
            return out
        return math.sqrt(a) * xt - math.sqrt(1.0 - a) * out  # Salimans & Ho, v-parametrisation

    def v_target(self, i, x0, noise):
        return math.sqrt(self.abar[i]) * noise - math.sqrt(1.0 - self.abar[i]) * x0


def gaussian_kl(m1, var1, m2, var2):
    """KL(N(m1, var1) || N(m2, var2)) in nats, elementwise."""
    return 0.5 * np.log(var2 / var1) + (var1 + (m1 - m2) ** 2) / (2.0 * var2) - 0.5


def ref_log_bin_probability(x, mean, std):
    """log P(x's 8-bit bin) under N(mean, std^2), with scipy.stats.norm (Ho et al. eq. 13).

    Edge bins run to -inf / +inf; the difference of CDFs is taken in whichever tail is smaller
    so that float64 keeps its digits.
    """
    x, mean = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(mean, np.float64))
    out = np.empty(x.shape)
    for idx in np.ndindex(x.shape):
        lo = (x[idx] - BIN - mean[idx]) / std
        hi = (x[idx] + BIN - mean[idx]) / std
        if x[idx] < -0.999:
            out[idx] = norm.logcdf(hi)
        elif x[idx] > 0.999:
            out[idx] = norm.logsf(lo)
        elif x[idx] > mean[idx]:
            out[idx] = math.log(norm.sf(lo) - norm.sf(hi))
        else:
            out[idx] = math.log(norm.cdf(hi) - norm.cdf(lo))
    return out


def quantize(x):
    """Round to the 256 levels of 8-bit data mapped to [-1, 1]."""
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


# A short schedule that ends far from pure noise (abar_T ~ 0.13), so the prior term matters. (The
# 1000/T-scaled linear schedule reaches beta_T = 1 at T = 20 and exceeds 1 below it.)
SHORT_BETAS = np.linspace(1e-3, 0.2, 20)


def make_diffusion(schedule="linear", T=40, respaced=False, **kwargs):
    betas = SHORT_BETAS if schedule == "short" else schedules.get_beta_schedule(schedule, T)
    kept = sorted({0, 1, 3, 4, 9, 17, 18, T // 2, T - 5, T - 1}) if respaced else None
    return GaussianDiffusion(betas, use_timesteps=kept, **kwargs), Ref(betas, kept)


def recording_model(output, calls):
    """A model_fn that returns a fixed output and records the timesteps it is given."""
    def model_fn(x, timesteps):
        calls.append(np.asarray(timesteps))
        return jnp.asarray(output, x.dtype)
    return model_fn


SHAPE = (4, 3, 2, 2)  # NHWC


# ============================================================================= schedule arrays
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("respaced", [False, True])
def test_precomputed_arrays_match_reference(schedule, respaced):
    d, ref = make_diffusion(schedule, T=1000 if schedule == "cosine" else 40, respaced=respaced)
    K = ref.K
    assert d.num_timesteps == K and d.timestep_map.tolist() == ref.kept
    for name, values in [
        ("betas", ref.beta),
        ("alphas_cumprod", ref.abar),
        ("alphas_cumprod_prev", [ref.abar_prev(i) for i in range(K)]),
        ("posterior_variance", [ref.posterior_variance(i) for i in range(K)]),
        ("posterior_log_variance_clipped",
         [ref.posterior_log_variance_clipped(i) for i in range(K)]),
        ("posterior_mean_coef1", [ref.coef_x0(i) for i in range(K)]),
        ("posterior_mean_coef2", [ref.coef_xt(i) for i in range(K)]),
        ("fixed_large_variance",
         [math.exp(ref.model_log_variance(i, "fixed_large")) for i in range(K)]),
    ]:
        array = getattr(d, name)
        assert array.dtype == np.float64, name
        np.testing.assert_allclose(array, values, rtol=1e-10, atol=0, err_msg=name)
    # Conventions at t = 0 (improved-diffusion).
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(ref.posterior_variance(1)))
    # The posterior at t = 0 is a point mass on x_0: coef1 = 1, coef2 = 0.
    assert d.posterior_mean_coef1[0] == pytest.approx(1.0, rel=1e-12)
    assert d.posterior_mean_coef2[0] == 0.0


# ============================================================================= forward process
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("respaced", [False, True])
def test_q_sample_and_posterior_match_reference(x64, schedule, respaced):
    d, ref = make_diffusion(schedule, respaced=respaced)
    rng = np.random.default_rng(0)
    x0 = quantize(rng.uniform(-1, 1, SHAPE))
    noise = rng.normal(size=SHAPE)
    t = np.array([0, 1, ref.K // 2, ref.K - 1])

    xt = np.asarray(d.q_sample(jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise)))
    mean, var, log_var = d.q_mean_variance(jnp.asarray(x0), jnp.asarray(t))
    pmean, pvar, plog_var = d.q_posterior_mean_variance(jnp.asarray(x0), jnp.asarray(xt),
                                                        jnp.asarray(t))
    assert xt.dtype == np.float64 and pmean.dtype == jnp.float64
    for b, i in enumerate(t):
        np.testing.assert_allclose(xt[b], ref.q_sample(i, x0[b], noise[b]), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(mean)[b], math.sqrt(ref.abar[i]) * x0[b],
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.broadcast_to(var[b], x0[b].shape), 1.0 - ref.abar[i],
                                   rtol=1e-10)
        np.testing.assert_allclose(np.broadcast_to(log_var[b], x0[b].shape),
                                   math.log(1.0 - ref.abar[i]), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(pmean)[b], ref.posterior_mean(i, x0[b], xt[b]),
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.broadcast_to(pvar[b], x0[b].shape),
                                   ref.posterior_variance(i), rtol=1e-10, atol=0)
        np.testing.assert_allclose(np.broadcast_to(plog_var[b], x0[b].shape),
                                   ref.posterior_log_variance_clipped(i), rtol=1e-10)


def test_posterior_mean_is_the_bayes_posterior_of_two_gaussians(x64):
    """Independent of eq. 7: q(x_{t-1} | x_0) and q(x_t | x_{t-1}) combined by Bayes' rule."""
    d, ref = make_diffusion("cosine", T=50)
    rng = np.random.default_rng(1)
    x0, xt = rng.uniform(-1, 1, SHAPE), rng.normal(size=SHAPE)
    t = np.array([1, 2, 25, 49])
    mean, var, _ = d.q_posterior_mean_variance(jnp.asarray(x0), jnp.asarray(xt), jnp.asarray(t))
    for b, i in enumerate(t):
        # prior x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}); likelihood
        # x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t): precision-weighted combination.
        a_prev, beta = ref.abar_prev(i), ref.beta[i]
        precision = 1.0 / (1.0 - a_prev) + (1.0 - beta) / beta
        post_mean = (math.sqrt(a_prev) * x0[b] / (1.0 - a_prev)
                     + math.sqrt(1.0 - beta) * xt[b] / beta) / precision
        np.testing.assert_allclose(np.asarray(mean)[b], post_mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.ravel(var[b])[0], 1.0 / precision, rtol=1e-9)


# ============================================================================= p_mean_variance
@pytest.mark.parametrize("schedule,respaced", [("linear", False), ("cosine", True),
                                               ("cosine", False), ("linear", True)])
@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_p_mean_variance_matches_reference(x64, schedule, respaced, mean_type, var_type):
    loss = "hybrid" if var_type == "learned_range" else "mse"
    d, ref = make_diffusion(schedule, respaced=respaced, model_mean_type=mean_type,
                            model_var_type=var_type, loss_type=loss)
    rng = np.random.default_rng(2)
    xt = 1.2 * rng.normal(size=SHAPE)
    # x0 outputs beyond [-1, 1] exercise the clipping; eps and v outputs are O(1).
    mean_out = rng.uniform(-1.5, 1.5, SHAPE) if mean_type == "x0" else rng.normal(size=SHAPE)
    v_out = rng.uniform(-1, 1, SHAPE)
    output = np.concatenate([mean_out, v_out], -1) if var_type == "learned_range" else mean_out
    t = np.array([0, 1, ref.K // 2, ref.K - 1])

    for clip in (True, False):
        calls = []
        out = d.p_mean_variance(recording_model(output, calls), jnp.asarray(xt), jnp.asarray(t),
                                clip_denoised=clip)
        # The model is called once, with the ORIGINAL timesteps.
        assert len(calls) == 1 and calls[0].tolist() == [ref.kept[i] for i in t]
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            assert out[key].shape == SHAPE and out[key].dtype == jnp.float64, key
        for b, i in enumerate(t):
            x0_hat = ref.pred_x0(i, mean_type, xt[b], mean_out[b])
            if clip:
                x0_hat = np.clip(x0_hat, -1.0, 1.0)
            log_var = np.vectorize(lambda v, i=i: ref.model_log_variance(i, var_type, v))(v_out[b])
            np.testing.assert_allclose(np.asarray(out["pred_xstart"])[b], x0_hat,
                                       rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(np.asarray(out["mean"])[b],
                                       ref.posterior_mean(i, x0_hat, xt[b]),
                                       rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(np.asarray(out["log_variance"])[b], log_var, rtol=1e-10)
            if var_type == "fixed_small" and i == 0:
                # improved-diffusion convention: variance beta~_0 = 0 while the log variance
                # is clipped to log beta~_1 (samplers add no noise at t = 0 anyway).
                np.testing.assert_array_equal(np.asarray(out["variance"])[b], 0.0)
            else:
                np.testing.assert_allclose(np.asarray(out["variance"])[b], np.exp(log_var),
                                           rtol=1e-10)


def test_p_mean_variance_true_eps_recovers_posterior(x64):
    """With the true eps the model's mean is exactly the true posterior mean (no clipping)."""
    d, ref = make_diffusion("cosine", T=100, model_mean_type="eps")
    rng = np.random.default_rng(3)
    x0, noise = quantize(rng.uniform(-1, 1, SHAPE)), rng.normal(size=SHAPE)
    t = jnp.asarray([1, 10, 50, 99])
    xt = d.q_sample(jnp.asarray(x0), t, jnp.asarray(noise))
    out = d.p_mean_variance(lambda x, s: jnp.asarray(noise), xt, t, clip_denoised=False)
    true_mean, _, _ = d.q_posterior_mean_variance(jnp.asarray(x0), xt, t)
    np.testing.assert_allclose(out["pred_xstart"], x0, atol=1e-10)
    np.testing.assert_allclose(out["mean"], true_mean, atol=1e-10)


def test_float32_by_default():
    """x64 off: schedule arrays are cast once and every output is float32, close to float64."""
    assert not jax.config.jax_enable_x64
    d, ref = make_diffusion("cosine", T=40, model_mean_type="eps",
                            model_var_type="learned_range", loss_type="hybrid")
    rng = np.random.default_rng(4)
    x0 = quantize(rng.uniform(-1, 1, SHAPE)).astype(np.float32)
    noise = rng.normal(size=SHAPE).astype(np.float32)
    output = np.concatenate([rng.normal(size=SHAPE), rng.uniform(-1, 1, SHAPE)], -1)
    model_fn = recording_model(output, [])
    t = jnp.asarray([0, 1, 20, 39], jnp.int32)

    xt = d.q_sample(jnp.asarray(x0), t, jnp.asarray(noise))
    assert xt.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in d.q_posterior_mean_variance(jnp.asarray(x0), xt, t))
    out = d.p_mean_variance(model_fn, xt, t)
    assert {k: out[k].dtype for k in ("mean", "variance", "log_variance", "pred_xstart")} == {
        k: jnp.float32 for k in ("mean", "variance", "log_variance", "pred_xstart")}
    terms = d.training_losses(model_fn, jnp.asarray(x0), t, jax.random.key(0),
                              noise=jnp.asarray(noise))
    assert all(v.dtype == jnp.float32 and v.shape == (4,) for v in terms.values())
    assert d.vb_terms_bpd(model_fn, jnp.asarray(x0), xt, t)["output"].dtype == jnp.float32
    assert d.prior_bpd(jnp.asarray(x0)).dtype == jnp.float32
    # Values agree with the float64 reference to float32 accuracy.
    for b, i in enumerate(np.asarray(t)):
        np.testing.assert_allclose(np.asarray(xt)[b], ref.q_sample(i, x0[b], noise[b]),
                                   rtol=1e-5, atol=1e-5)
        x0_hat = np.clip(ref.pred_x0(i, "eps", np.asarray(xt, np.float64)[b], output[b, ..., :2]),
                         -1, 1)
        np.testing.assert_allclose(np.asarray(out["pred_xstart"])[b], x0_hat, rtol=1e-4,
                                   atol=1e-4)


def test_float32_inputs_stay_float32_under_x64(x64):
    """The dtype follows x, not the x64 flag: float32 data in a float64-enabled process."""
    d, _ = make_diffusion("cosine", T=10, model_var_type="learned_range", loss_type="hybrid")
    x0 = jnp.asarray(quantize(np.random.default_rng(14).uniform(-1, 1, SHAPE)), jnp.float32)
    t = jnp.asarray([0, 1, 5, 9])

    def model_fn(x, s):
        return jnp.zeros(SHAPE[:-1] + (4,), jnp.float32)

    assert d.q_sample(x0, t, x0).dtype == jnp.float32
    out = d.p_mean_variance(model_fn, x0, t)
    assert all(out[k].dtype == jnp.float32 for k in ("mean", "variance", "log_variance"))
    terms = d.training_losses(model_fn, x0, t, jax.random.key(0))
    assert {k: v.dtype for k, v in terms.items()} == {k: jnp.float32 for k in terms}
    assert d.prior_bpd(x0).dtype == jnp.float32
    assert d.calc_bpd_loop(model_fn, x0, jax.random.key(0))["total_bpd"].dtype == jnp.float32


# ============================================================================= training losses
def hybrid_setup(mean_type, T=100, schedule="linear"):
    d, ref = make_diffusion(schedule, T=T, model_mean_type=mean_type,
                            model_var_type="learned_range", loss_type="hybrid")
    rng = np.random.default_rng(5)
    x0 = quantize(rng.uniform(-1, 1, SHAPE))
    noise = rng.normal(size=SHAPE)
    return d, ref, x0, noise, rng


def ref_true_target(ref, mean_type, i, x0, noise):
    return {"eps": noise, "x0": x0, "v": ref.v_target(i, x0, noise)}[mean_type]


def ref_vb_kl_bits(ref, i, mean_type, x0, noise, mean_out, v_out):
    """The t > 0 bound term in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) / ln 2."""
    xt = ref.q_sample(i, x0, noise)
    true_mean = ref.posterior_mean(i, x0, xt)
    model_mean = ref.posterior_mean(i, ref.pred_x0(i, mean_type, xt, mean_out), xt)
    model_var = np.exp(np.vectorize(lambda v: ref.model_log_variance(i, "learned_range", v))(v_out))
    kl = gaussian_kl(true_mean, ref.posterior_variance(i), model_mean, model_var)
    return kl.mean() / LN2


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_hybrid_loss_with_optimal_mean_matches_closed_form_kl(x64, mean_type):
    T = 100
    d, ref, x0, noise, rng = hybrid_setup(mean_type, T=T)
    t = np.array([1, 7, 50, 99])
    mean_out = np.stack([ref_true_target(ref, mean_type, i, x0[b], noise[b])
                         for b, i in enumerate(t)])
    # A chosen variance per pixel, sigma^2 between beta~_t and beta_t, expressed as the v channel:
    # out = 2 (log sigma^2 - log beta~_t) / (log beta_t - log beta~_t) - 1.
    frac = rng.uniform(0.05, 0.95, SHAPE)
    v_out = np.empty(SHAPE)
    for b, i in enumerate(t):
        lo, hi = ref.posterior_log_variance_clipped(i), math.log(ref.beta[i])
        log_sigma2 = lo + frac[b] * (hi - lo)
        v_out[b] = 2.0 * (log_sigma2 - lo) / (hi - lo) - 1.0
    output = np.concatenate([mean_out, v_out], -1)

    calls = []
    terms = d.training_losses(recording_model(output, calls), jnp.asarray(x0), jnp.asarray(t),
                              jax.random.key(0), noise=jnp.asarray(noise))
    assert set(terms) == {"loss", "mse", "vb"}
    assert len(calls) == 1  # one forward pass serves both terms
    np.testing.assert_allclose(terms["mse"], 0.0, atol=1e-20)
    for b, i in enumerate(t):
        # With the true mean the KL is the variance mismatch alone:
        # 0.5 (log(s2/s1) + s1/s2 - 1), s1 = beta~_t, s2 = the chosen sigma^2.
        s1 = ref.posterior_variance(i)
        s2 = np.exp(ref.posterior_log_variance_clipped(i)
                    + frac[b] * (math.log(ref.beta[i]) - ref.posterior_log_variance_clipped(i)))
        closed_form = (0.5 * (np.log(s2 / s1) + s1 / s2 - 1.0)).mean() / LN2 * T / 1000.0
        assert float(terms["vb"][b]) == pytest.approx(closed_form, rel=1e-10)
        assert float(terms["vb"][b]) == pytest.approx(
            ref_vb_kl_bits(ref, i, mean_type, x0[b], noise[b], mean_out[b], v_out[b])
            * T / 1000.0, rel=1e-10)
    np.testing.assert_allclose(terms["loss"], terms["vb"], rtol=1e-12)

    # Choosing sigma^2 = beta~_t exactly (v = -1) makes the bound term vanish.
    output_exact = np.concatenate([mean_out, -np.ones(SHAPE)], -1)
    terms = d.training_losses(recording_model(output_exact, []), jnp.asarray(x0),
                              jnp.asarray(t), jax.random.key(0), noise=jnp.asarray(noise))
    np.testing.assert_allclose(terms["vb"], 0.0, atol=1e-12)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_hybrid_loss_with_wrong_mean(x64, mean_type):
    """A perturbed mean: mse is the mean squared perturbation and the KL has a mean term."""
    T = 100
    d, ref, x0, noise, rng = hybrid_setup(mean_type, T=T, schedule="cosine")
    t = np.array([3, 20, 60, 98])
    delta = 0.3 * rng.normal(size=SHAPE)
    mean_out = np.stack([ref_true_target(ref, mean_type, i, x0[b], noise[b])
                         for b, i in enumerate(t)]) + delta
    v_out = rng.uniform(-1, 1, SHAPE)
    output = np.concatenate([mean_out, v_out], -1)
    terms = d.training_losses(recording_model(output, []), jnp.asarray(x0), jnp.asarray(t),
                              jax.random.key(0), noise=jnp.asarray(noise))
    for b, i in enumerate(t):
        assert float(terms["mse"][b]) == pytest.approx((delta[b] ** 2).mean(), rel=1e-10)
        vb = ref_vb_kl_bits(ref, i, mean_type, x0[b], noise[b], mean_out[b], v_out[b]) * T / 1000
        assert float(terms["vb"][b]) == pytest.approx(vb, rel=1e-10)
        assert float(terms["loss"][b]) == pytest.approx((delta[b] ** 2).mean() + vb, rel=1e-10)


def test_hybrid_stop_gradient_on_mean(x64):
    """d vb / d(mean part) = 0 (Nichol & Dhariwal sec. 3.1); d vb / d(v channel) != 0."""
    T = 100
    d, ref, x0, noise, rng = hybrid_setup("eps", T=T)
    t = np.array([1, 7, 50, 99])
    v_init = rng.uniform(-0.8, 0.8, SHAPE)

    def make_model(params):
        def model_fn(x, timesteps):
            eps = params["scale"] * jnp.asarray(noise) + params["shift"]
            return jnp.concatenate([eps, params["v"]], -1)
        return model_fn

    params = {"scale": jnp.asarray(0.9), "shift": jnp.asarray(0.1), "v": jnp.asarray(v_init)}

    def term(name, diffusion=d):
        def f(p):
            return jnp.sum(diffusion.training_losses(make_model(p), jnp.asarray(x0),
                                                     jnp.asarray(t), jax.random.key(0),
                                                     noise=jnp.asarray(noise))[name])
        return jax.grad(f)(params)

    g_vb = term("vb")
    assert float(g_vb["scale"]) == 0.0 and float(g_vb["shift"]) == 0.0
    assert np.all(np.abs(np.asarray(g_vb["v"])) > 0)
    # The gradient wrt v is the derivative of the closed-form KL (central differences on Ref).
    mean_out = 0.9 * noise + 0.1
    for b, i in [(1, 7), (2, 50)]:
        for idx in [(0, 0, 0), (2, 1, 1)]:
            h = 1e-6
            plus, minus = v_init[b].copy(), v_init[b].copy()
            plus[idx] += h
            minus[idx] -= h
            numeric = (ref_vb_kl_bits(ref, i, "eps", x0[b], noise[b], mean_out[b], plus)
                       - ref_vb_kl_bits(ref, i, "eps", x0[b], noise[b], mean_out[b], minus)
                       ) / (2 * h) * T / 1000.0
            assert float(g_vb["v"][(b,) + idx]) == pytest.approx(numeric, rel=1e-5)
    # The mse term trains the mean and not v; the total loss gets the mean gradient from mse only.
    g_mse, g_loss = term("mse"), term("loss")
    assert abs(float(g_mse["scale"])) > 1e-3 and float(np.abs(g_mse["v"]).max()) == 0.0
    assert float(g_loss["scale"]) == pytest.approx(float(g_mse["scale"]), rel=1e-12)
    np.testing.assert_allclose(g_loss["v"], g_vb["v"], rtol=1e-12)
    # Contrast: with loss_type "kl" the bound does train the mean.
    d_kl = GaussianDiffusion(schedules.get_beta_schedule("linear", T), "eps", "learned_range",
                             "kl")
    g_kl = term("loss", d_kl)
    assert abs(float(g_kl["scale"])) > 1e-3 and abs(float(g_kl["shift"])) > 1e-3


@pytest.mark.parametrize("var_type", ["learned_range", "fixed_large"])
def test_kl_loss_is_T_times_the_bound_term(x64, var_type):
    T = 60
    d, ref = make_diffusion("linear", T=T, model_mean_type="eps", model_var_type=var_type,
                            loss_type="kl")
    rng = np.random.default_rng(6)
    x0, noise = quantize(rng.uniform(-1, 1, SHAPE)), rng.normal(size=SHAPE)
    mean_out = noise + 0.2 * rng.normal(size=SHAPE)
    v_out = rng.uniform(-1, 1, SHAPE)
    output = np.concatenate([mean_out, v_out], -1) if var_type == "learned_range" else mean_out
    t = np.array([0, 1, 30, 59])
    terms = d.training_losses(recording_model(output, []), jnp.asarray(x0), jnp.asarray(t),
                              jax.random.key(0), noise=jnp.asarray(noise))
    assert set(terms) == {"loss", "vb"}
    for b, i in enumerate(t):
        xt = ref.q_sample(i, x0[b], noise[b])
        model_mean = ref.posterior_mean(i, ref.pred_x0(i, "eps", xt, mean_out[b]), xt)
        log_var = np.vectorize(lambda v, i=i: ref.model_log_variance(i, var_type, v))(v_out[b])
        if i == 0:  # the decoder term -log p(x_0 | x_1), Ho et al. eq. 13
            log_p = [ref_log_bin_probability(x0[b][k], model_mean[k], np.exp(0.5 * log_var[k]))
                     for k in np.ndindex(x0[b].shape)]
            bits = -np.mean(log_p) / LN2
        else:
            bits = gaussian_kl(ref.posterior_mean(i, x0[b], xt), ref.posterior_variance(i),
                               model_mean, np.exp(log_var)).mean() / LN2
        assert float(terms["loss"][b]) == pytest.approx(T * bits, rel=1e-10)
    np.testing.assert_array_equal(terms["loss"], terms["vb"])


def test_training_losses_mse_targets_and_original_timesteps(x64):
    """mse loss for each mean type against its target; respaced, the model sees timestep_map[t]."""
    for mean_type in ("eps", "x0", "v"):
        d, ref = make_diffusion("cosine", T=40, respaced=True, model_mean_type=mean_type,
                                model_var_type="fixed_large", loss_type="mse")
        rng = np.random.default_rng(7)
        x0, noise = quantize(rng.uniform(-1, 1, SHAPE)), rng.normal(size=SHAPE)
        output = rng.normal(size=SHAPE)
        t = np.array([0, 2, 5, ref.K - 1])
        calls = []
        terms = d.training_losses(recording_model(output, calls), jnp.asarray(x0),
                                  jnp.asarray(t), jax.random.key(0), noise=jnp.asarray(noise))
        assert set(terms) == {"loss", "mse"}
        assert calls[0].tolist() == [ref.kept[i] for i in t] == [0, 3, 17, 39]
        for b, i in enumerate(t):
            target = ref_true_target(ref, mean_type, i, x0[b], noise[b])
            assert float(terms["loss"][b]) == pytest.approx(((target - output[b]) ** 2).mean(),
                                                            rel=1e-10)


def test_training_losses_jit_and_default_noise():
    d, _ = make_diffusion("linear", T=40, model_var_type="learned_range", loss_type="hybrid")
    x0 = jnp.asarray(quantize(np.random.default_rng(8).uniform(-1, 1, SHAPE)), jnp.float32)
    t = jnp.asarray([0, 5, 20, 39])

    def model_fn(x, s):
        return jnp.concatenate([0.5 * x, jnp.tanh(x)], -1)

    loss = jax.jit(lambda k: d.training_losses(model_fn, x0, t, k)["loss"])
    a, b = loss(jax.random.key(1)), loss(jax.random.key(2))
    eager = d.training_losses(model_fn, x0, t, jax.random.key(1))["loss"]
    np.testing.assert_allclose(a, eager, rtol=1e-5)
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)  # the key draws the noise


# ============================================================================= decoder, prior
def test_discretized_gaussian_log_likelihood_float64_matches_scipy(x64):
    rng = np.random.default_rng(9)
    x = quantize(rng.uniform(-1.1, 1.1, 400))
    x[:3] = [-1.0, 1.0, 0.0]
    std = 0.01
    means = x + std * rng.uniform(-6, 6, x.shape)
    got = diffusion_lib.discretized_gaussian_log_likelihood(
        jnp.asarray(x), jnp.asarray(means), jnp.full(x.shape, math.log(std)))
    np.testing.assert_allclose(got, ref_log_bin_probability(x, means, std), rtol=1e-10,
                               atol=1e-15)


def test_discretized_gaussian_log_likelihood_float32_tails_symmetric():
    """float32: a pixel k sigma above the mean is as likely as the mirrored one k sigma below."""
    std = 0.007
    offsets = std * np.array([0.0, 1.0, 3.0, 5.0, 6.0, 7.0])
    x = np.float32(0.2)
    log_scale = jnp.full(offsets.shape, math.log(std), jnp.float32)
    above = diffusion_lib.discretized_gaussian_log_likelihood(
        jnp.full(offsets.shape, x), jnp.asarray(x - offsets, jnp.float32), log_scale)
    below = diffusion_lib.discretized_gaussian_log_likelihood(
        jnp.full(offsets.shape, -x), jnp.asarray(-x + offsets, jnp.float32), log_scale)
    expected = ref_log_bin_probability(np.full(offsets.shape, float(x)), float(x) - offsets, std)
    assert above.dtype == jnp.float32
    np.testing.assert_allclose(below, expected, rtol=1e-4)
    np.testing.assert_allclose(above, expected, rtol=1e-4)


def test_decoder_term_at_t0_matches_scipy(x64):
    """vb_terms_bpd at t = 0 is -mean log P(x_0's bin) / ln 2 under the model's Gaussian."""
    T = 1000
    d, ref = make_diffusion("linear", T=T, model_mean_type="x0",
                            model_var_type="learned_range", loss_type="hybrid")
    rng = np.random.default_rng(10)
    x0 = quantize(rng.uniform(-1.1, 1.1, SHAPE))  # includes the edge bins -1 and 1
    x0[0, 0, 0] = [-1.0, 1.0]
    xt = ref.q_sample(0, x0, rng.normal(size=SHAPE))
    pred = np.clip(x0 + 0.015 * rng.normal(size=SHAPE), -1, 1)  # a near-miss x_0 prediction
    v_out = rng.uniform(-1, 1, SHAPE)
    output = np.concatenate([pred, v_out], -1)
    t = np.zeros(4, np.int64)
    got = d.vb_terms_bpd(recording_model(output, []), jnp.asarray(x0), jnp.asarray(xt),
                         jnp.asarray(t), clip_denoised=False)["output"]
    for b in range(4):
        mean = ref.posterior_mean(0, pred[b], xt[b])  # = pred, as coef_x0(0) = 1, coef_xt(0) = 0
        log_p = [ref_log_bin_probability(x0[b][k], mean[k],
                                         math.exp(0.5 * ref.model_log_variance(0, "learned_range",
                                                                               v_out[b][k])))
                 for k in np.ndindex(x0[b].shape)]
        assert float(got[b]) == pytest.approx(-np.mean(log_p) / LN2, rel=1e-10)


@pytest.mark.parametrize("respaced", [False, True])
def test_prior_bpd_matches_closed_form(x64, respaced):
    d, ref = make_diffusion("short", T=20, respaced=respaced)
    x0 = quantize(np.random.default_rng(11).uniform(-1, 1, SHAPE))
    a = ref.abar[-1]
    # KL(N(sqrt(a) x0, 1 - a) || N(0, 1)) = 0.5 (-1 - log(1 - a) + (1 - a) + a x0^2)
    closed = (0.5 * (-1.0 - math.log(1.0 - a) + (1.0 - a) + a * x0 ** 2)).mean(axis=(1, 2, 3))
    got = d.prior_bpd(jnp.asarray(x0))
    np.testing.assert_allclose(got, closed / LN2, rtol=1e-10)
    assert np.all(np.asarray(got) > 0.02)  # not negligible, so the check has teeth


# ============================================================================= calc_bpd_loop
def mixture_data(rng, n):
    """8-bit images from a two-component Gaussian mixture, clipped to [-1, 1]."""
    centers = np.array([-0.6, 0.5])
    which = rng.integers(0, 2, n)
    return quantize(centers[which, None, None, None] + 0.4 * rng.normal(size=(n, 4, 4, 1)))


def test_calc_bpd_loop_oracle_denoiser_zeros(x64):
    """The x0-oracle's bound is prior + decoder in closed form; the exact posterior-mean denoiser
    of the data distribution is worse; predicting zeros is far worse (with fixed_small)."""
    T = 20
    d, ref = make_diffusion("short", T=T, model_mean_type="x0", model_var_type="fixed_small")
    rng = np.random.default_rng(12)
    atoms = mixture_data(rng, 6)  # the data distribution: uniform over 6 images
    x0 = atoms[:4]
    key = jax.random.key(3)

    def oracle(x, s):  # knows the true x_0 of each example
        return jnp.asarray(x0)

    def zeros(x, s):
        return jnp.zeros_like(x)

    abar_table = jnp.asarray(ref.abar_full)

    def denoiser(x, s):
        # E[x_0 | x_t] for x_0 uniform over the atoms a_n: weights
        # softmax_n(-|x_t - sqrt(abar_t) a_n|^2 / (2 (1 - abar_t))), abar of the original step.
        a = abar_table[s][:, None]
        sq = jnp.sum((x[:, None] - jnp.sqrt(a)[..., None, None, None] * atoms[None]) ** 2,
                     axis=(2, 3, 4))
        w = jax.nn.softmax(-sq / (2.0 * (1.0 - a)), axis=1)
        return jnp.einsum("bn,nhwc->bhwc", w, atoms)

    results = {name: d.calc_bpd_loop(fn, jnp.asarray(x0), key)
               for name, fn in [("oracle", oracle), ("denoiser", denoiser), ("zeros", zeros)]}
    for r in results.values():
        assert r["vb"].shape == (4, T) and r["total_bpd"].shape == (4,)
        assert np.all(np.isfinite(r["total_bpd"]))
        np.testing.assert_allclose(r["total_bpd"], np.sum(r["vb"], 1) + r["prior_bpd"],
                                   rtol=1e-12)

    # Oracle: every KL term is 0 (same mean, same variance beta~_t), so the bound is the
    # prior plus the decoder, whose bins are centred on the mean: P = Phi(h/s) - Phi(-h/s)
    # inside, Phi(h/s) at the edges, s^2 = beta~_1.
    oracle_r = results["oracle"]
    np.testing.assert_allclose(oracle_r["vb"][:, 1:], 0.0, atol=1e-12)
    s = math.sqrt(ref.posterior_variance(1))
    inner = math.log(norm.cdf(BIN / s) - norm.cdf(-BIN / s))
    edge = norm.logcdf(BIN / s)
    decoder = -np.where(np.abs(x0) > 0.999, edge, inner).mean(axis=(1, 2, 3)) / LN2
    a = ref.abar[-1]
    prior = (0.5 * (-1.0 - math.log(1.0 - a) + (1.0 - a) + a * x0 ** 2)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(oracle_r["vb"][:, 0], decoder, rtol=1e-10)
    np.testing.assert_allclose(oracle_r["total_bpd"], decoder + prior / LN2, rtol=1e-10)
    np.testing.assert_allclose(oracle_r["xstart_mse"], 0.0, atol=1e-20)
    np.testing.assert_allclose(oracle_r["mse"], 0.0, atol=1e-14)

    # Zeros: pred_x0 = 0, so mu = coef_xt x_t and the KL at t > 0 is coef_x0^2 x0^2 / (2 beta~_t).
    zeros_r = results["zeros"]
    for i in range(1, T):
        kl = (ref.coef_x0(i) ** 2 * x0 ** 2 / (2 * ref.posterior_variance(i))).mean(axis=(1, 2, 3))
        np.testing.assert_allclose(zeros_r["vb"][:, i], kl / LN2, rtol=1e-10)
    np.testing.assert_allclose(zeros_r["xstart_mse"], np.broadcast_to(
        (x0 ** 2).mean(axis=(1, 2, 3))[:, None], (4, T)), rtol=1e-12)

    # Better model, lower bound: oracle <= exact denoiser < zeros, per example.
    total = {k: np.asarray(r["total_bpd"]) for k, r in results.items()}
    assert np.all(total["oracle"] <= total["denoiser"] + 1e-9)
    assert np.all(total["denoiser"] < total["zeros"] - 1.0)
    assert np.all(total["denoiser"] > total["oracle"] + 1e-3)


@pytest.mark.parametrize("clip", [True, False])
def test_calc_bpd_loop_clip_denoised(x64, clip):
    """An x0 prediction of 1.5 x0 is clipped to [-1, 1] only when clip_denoised; for t > 0 the
    KL is coef_x0^2 (x0 - x0_hat)^2 / (2 beta~_t) (equal variances, fixed_small)."""
    T = 20
    d, ref = make_diffusion("short", T=T, model_mean_type="x0", model_var_type="fixed_small")
    x0 = mixture_data(np.random.default_rng(15), 3)
    r = d.calc_bpd_loop(lambda x, s: 1.5 * jnp.asarray(x0), jnp.asarray(x0), jax.random.key(5),
                        clip_denoised=clip)
    x0_hat = np.clip(1.5 * x0, -1, 1) if clip else 1.5 * x0
    for i in range(1, T):
        kl = (ref.coef_x0(i) ** 2 * (x0 - x0_hat) ** 2
              / (2 * ref.posterior_variance(i))).mean(axis=(1, 2, 3))
        np.testing.assert_allclose(r["vb"][:, i], kl / LN2, rtol=1e-10)
    np.testing.assert_allclose(r["xstart_mse"][:, 0], ((x0 - x0_hat) ** 2).mean(axis=(1, 2, 3)),
                               rtol=1e-10)


def test_calc_bpd_loop_respaced_calls_model_with_original_timesteps(x64):
    T = 40
    d, ref = make_diffusion("cosine", T=T, respaced=True, model_mean_type="eps",
                            model_var_type="fixed_large")
    x0 = mixture_data(np.random.default_rng(13), 2)
    seen = []

    def model_fn(x, s):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), s)
        return 0.1 * x

    r = d.calc_bpd_loop(model_fn, jnp.asarray(x0), jax.random.key(4))
    jax.effects_barrier()
    assert r["vb"].shape == (2, ref.K) and np.all(np.isfinite(r["total_bpd"]))
    assert sorted({int(v) for s in seen for v in s}) == ref.kept
    assert all(len(set(s.tolist())) == 1 for s in seen)  # one timestep per call


# ============================================================================= bad input
def test_unknown_names_raise_with_allowed_values():
    betas = schedules.get_beta_schedule("cosine", 10)
    with pytest.raises(ValueError, match=r"model_mean_type 'epsilon'; allowed: eps, x0, v"):
        GaussianDiffusion(betas, "epsilon", "fixed_large", "mse")
    with pytest.raises(ValueError, match=r"model_var_type 'learned'; allowed: fixed_small, "
                                         r"fixed_large, learned_range"):
        GaussianDiffusion(betas, "eps", "learned", "mse")
    with pytest.raises(ValueError, match=r"loss_type 'l2'; allowed: mse, hybrid, kl"):
        GaussianDiffusion(betas, "eps", "fixed_large", "l2")
    with pytest.raises(ValueError, match=r"'mse'.*learned variance.*'hybrid' or 'kl'"):
        GaussianDiffusion(betas, "eps", "learned_range", "mse")


def test_bad_betas_and_timesteps():
    with pytest.raises(ValueError, match=r"betas.*\(0, 1\]"):
        GaussianDiffusion(np.array([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError, match=r"betas.*1-D"):
        GaussianDiffusion(np.full((2, 3), 0.1))
    with pytest.raises(ValueError, match=r"\[0, 9\].*got 0\.\.12"):
        GaussianDiffusion(schedules.get_beta_schedule("cosine", 10), use_timesteps=[0, 5, 12])


def test_shape_mismatches_raise():
    d, _ = make_diffusion("cosine", T=10, model_var_type="learned_range", loss_type="hybrid")
    x = jnp.zeros(SHAPE)
    t3 = jnp.asarray([0, 1, 2])
    t4 = jnp.asarray([0, 1, 2, 3])
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"t must have shape \[batch\] = \(4,\), got \(3,\)"):
        d.q_sample(x, t3, x)
    with pytest.raises(ValueError, match=r"t must have shape \[batch\] = \(4,\), got \(3,\)"):
        d.training_losses(lambda x, s: jnp.zeros(SHAPE[:-1] + (4,)), x, t3, key)
    with pytest.raises(ValueError, match=r"t must have shape \[batch\] = \(4,\), got \(4, 1\)"):
        d.p_mean_variance(lambda x, s: jnp.zeros(SHAPE[:-1] + (4,)), x, t4[:, None])
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 1\) vs x \(4, 3, 2, 2\)"):
        d.q_sample(x, t4, jnp.zeros((4, 3, 2, 1)))
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 1\) vs x \(4, 3, 2, 2\)"):
        d.training_losses(lambda x, s: jnp.zeros(SHAPE[:-1] + (4,)), x, t4, key,
                          noise=jnp.zeros((4, 3, 2, 1)))
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 2\); learned_range needs \(4, 3, 2, 4\)"):
        d.p_mean_variance(lambda x, s: jnp.zeros(SHAPE), x, t4)
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 3\); learned_range needs \(4, 3, 2, 4\)"):
        d.training_losses(lambda x, s: jnp.zeros(SHAPE[:-1] + (3,)), x, t4, key)
    fixed, _ = make_diffusion("cosine", T=10, model_var_type="fixed_small")
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 4\), expected \(4, 3, 2, 2\) for "
                                         r"model_var_type 'fixed_small'"):
        fixed.training_losses(lambda x, s: jnp.zeros(SHAPE[:-1] + (4,)), x, t4, key)


# ============================================================================= factory
def test_create_diffusion_from_config():
    class Config:
        schedule, num_timesteps = "cosine", 100
        mean_type, var_type, loss_type = "v", "learned_range", "hybrid"
        loss_weighting, min_snr_gamma = "min_snr", 5.0

    full = diffusion_lib.create_diffusion(Config)
    assert full.num_timesteps == 100 and full.model_mean_type == "v"
    snr = full.alphas_cumprod / (1 - full.alphas_cumprod)
    np.testing.assert_allclose(full.loss_weights, np.minimum(snr, 5.0) / (snr + 1), rtol=1e-12)
    np.testing.assert_array_equal(full.betas, schedules.get_beta_schedule("cosine", 100))
    spaced = diffusion_lib.create_diffusion(Config, "ddim10")
    assert spaced.timestep_map.tolist() == list(range(0, 100, 10))
    assert spaced.original_num_steps == 100 and spaced.num_timesteps == 10
    listed = diffusion_lib.create_diffusion(Config, [5, 5])
    assert listed.timestep_map.tolist() == sorted(schedules.space_timesteps(100, [5, 5]))
    kept = diffusion_lib.create_diffusion(Config, {0, 50, 99})
    assert kept.timestep_map.tolist() == [0, 50, 99]
