"""Variational Diffusion Model objective (Kingma et al. 2021; Luo 2022).

Notation (Luo 2022, "Understanding Diffusion Models: A Unified Perspective"): data x_0,
latents x_1 .. x_T, encoder q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, (1 - alpha_t) I),
so q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). The schedule is written as
gamma(tau) = -log SNR(tau) on tau in [0, 1] (Kingma et al. sec. 3.2): latent x_t sits at
tau_t = (t - 1) / (T - 1), so abar_t = sigmoid(-gamma(tau_t)), x_1 is the least noisy
latent (gamma_min) and x_T the noisiest (gamma_max). ``num_timesteps: 0`` is the
continuous-time limit T -> infinity (Kingma et al. eq. 17); both share one code path.

The negative ELBO, in nats per sample, splits into three terms (Luo eq. 58):

  recon  = -E_{q(x_1|x_0)} log p(x_0 | x_1)
  prior  = KL(q(x_T | x_0) || N(0, I))
  diff   = sum_{t=2}^{T} E_{q(x_t|x_0)} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))

with p(x_{t-1} | x_t) = q(x_{t-1} | x_t, x_0 = x_hat(x_t)) and x_hat given by an
eps-prediction network conditioned on gamma (not on tau, so that in continuous time the
loss depends on the schedule only through its endpoints, Kingma et al. sec. 5.1). Each KL
is 0.5 (SNR_{t-1} - SNR_t) ||x_0 - x_hat||^2 = 0.5 expm1(gamma_t - gamma_{t-1})
||eps - eps_hat||^2 (Kingma et al. eq. 13); as T -> infinity the sum becomes
0.5 int_0^1 gamma'(tau) E||eps - eps_hat||^2 dtau (Kingma et al. eq. 17).

``diffusion_form: consistency`` uses instead Luo's first decomposition (eq. 45):

  recon  = -E_{q(x_1|x_0)} log p(x_0 | x_1)                                (unchanged)
  prior  = E_{q(x_{T-1}|x_0)} KL(q(x_T | x_{T-1}) || N(0, I))
  diff   = sum_{t=1}^{T-1} E_{q(x_{t-1}, x_t, x_{t+1} | x_0)} [log q(x_t | x_{t-1}) - log p(x_t | x_{t+1})]

Caution, established in closed form on a 1-D Gaussian chain (the joint covariance of the
forward chain, float64) by test_decompositions_and_which_consistency_estimator_is_exact in
tests/unit/test_vdm_gaussian.py; the module's consistency estimator is checked against those
exact terms, one by one, by test_module_terms_match_closed_form_per_term there. Luo eq. 45 writes the
consistency term as E_{q(x_{t-1}, x_{t+1}|x_0)} KL(q(x_t|x_{t-1}) || p(x_t|x_{t+1})),
i.e. with x_t drawn from q(x_t | x_{t-1}) *independently of* x_{t+1}. Under the forward
chain x_t given (x_{t-1}, x_{t+1}) is not distributed as q(x_t | x_{t-1}), so that
expression is not the ELBO (it over-counts; on a 1-D Gaussian chain it differs from the
exact ELBO). The exact term takes the expectation over the *joint* forward chain, which
is what we estimate: x_t ~ q(x_t | x_0), x_{t+1} ~ q(x_{t+1} | x_t). The
-log q(x_t | x_{t-1}) part is replaced by its conditional expectation given x_{t-1} (the
entropy of q(x_t | x_{t-1}), a constant), exact by the tower property and of lower
variance, so x_{t-1} need not be sampled. Both forms give the same ELBO in expectation;
the denoising-matching form has far lower variance and is the default. The consistency
form exists only in discrete time (its terms do not vanish as T -> infinity).

Decoders p(x_0 | x_1): for +1/-1 spins and k-level data the discrete decoder of Kingma et
al. (sec. 3.3 / App. C), p(x | z) proportional to q(z | x) normalised over the allowed
values per dimension, so bits/dim are true discrete likelihoods; for continuous data the
Gaussian p(x | z) = N(z / alpha, sigma^2 / alpha^2), a density in data units.

Layout: :mod:`.config` (``VDMConfig``, torch-free), :mod:`.terms` (the ELBO terms above as
functions), :mod:`.denoiser` (the eps-prediction network), :mod:`.model` (the ``VDM`` objective:
training estimate, sampling), :mod:`.schedules` (gamma(tau)), :mod:`.timesteps` (time-step
samplers). The exact (all-terms) evaluator is evaluation code: :func:`pipeline.eval.elbo.exact_elbo`.
"""

from pipeline.lazy import lazy_exports

# Public name -> the submodule that defines it, imported on first use so that
# ``pipeline.objectives.vdm.config`` stays torch-free (pipeline/lazy.py says why).
_EXPORTS = {"VDMConfig": "config", "Denoiser": "denoiser", "VDM": "model", "VDMOutput": "model",
            "build_phases": "model"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
