"""The GAN's configuration: :class:`GANConfig` and every check that needs only the config.

Kept free of torch and numpy so that parsing and validating a config (``pipeline.config``,
the CLI's argument errors) never imports them. Checks that need the data's manifest (shapes,
label kinds) are :meth:`GANConfig.check_data`, which the CLI runs before any process group
starts or anything is written to the run directory (issue 15 item 10), and
:func:`pipeline.objectives.gan.nets.build_nets` again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.data.meta import DataMeta


@dataclass
class GANConfig:
    loss: Literal["minimax", "non-saturating", "wgan-gp", "hinge"] = "non-saturating"
    latent_dim: int = 64
    latent_prior: Literal["uniform", "normal"] = "uniform"  # uniform: U(-1, 1)^latent_dim (the seed's)
    n_critic: int = 1  # D steps per G step (WGAN-GP: 5)
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    # Adam betas of both phases; null = train.betas. WGAN-GP uses (0.0, 0.9), DCGAN (0.5, 0.999).
    betas: tuple[float, float] | None = None
    gp_weight: float = 10.0  # lambda of the gradient penalty (Gulrajani et al. 2017, eq. 3)
    # gamma of the R1 penalty on real data for the logistic losses (Mescheder et al. 2018,
    # eq. 9): D's loss + gamma/2 E_real ||grad_x D(x)||^2. 0 = off. Penalising D's slope on
    # the data makes the game locally convergent where the unregularised one oscillates.
    r1_weight: float = 0.0
    conditional: bool = False  # labels into G and D (projection discriminator)
    # Widths: conv channels per stride-2 stage (G mirrors D), or MLP hidden widths.
    channels: list[int] = field(default_factory=lambda: [64, 128])
    # auto: conv for samples of shape (C, H, W), and for (C, L) / (C, D, H, W) grids whose
    # manifest declares a boundary (fields: GRF, phi^4); MLP otherwise. conv: any of the three.
    arch: Literal["auto", "conv", "mlp"] = "auto"
    # auto: circular padding for spins and for data whose manifest says boundary=periodic
    # (a torus: GRFs, phi^4), zeros otherwise.
    padding: Literal["auto", "zeros", "circular"] = "auto"
    spectral_norm: bool = False  # on D's layers (Miyato et al. 2018)
    # Spin lattices only: D's features also carry each lattice's nearest-neighbour, diagonal
    # and distance-2 correlations and |m| (pipeline.models.gan_features.lattice_observables),
    # so D measures the energy per spin and its spread at every temperature directly.
    d_lattice_observables: bool = False
    # Conv D: width of a hidden layer (LeakyReLU) between D's pooled features and its output;
    # 0 = none (D's output is then linear in the features averaged over positions, so it
    # compares only the distribution of single receptive fields between real and fake, not
    # that of lattice-wide sums such as the magnetisation: pipeline.models.gan_nets).
    d_head_hidden: int = 0
    # Periodic fields: D also reads each channel's mean Fourier amplitude per |k| shell
    # (pipeline.models.gan_features.spectral_amplitudes; 1-Lipschitz, so safe for WGAN-GP), so
    # it compares the power spectrum directly, k = 0 (|M|) included: the conv D beside its
    # pooled features, the MLP D beside the field at its input.
    d_spectral_features: bool = False
    # Conv G: a per-channel constant, linear in the vector latent (and label), added to G's
    # output: the k = 0 mode (a field's mean) on its own path (pipeline.models.gan_nets).
    g_zero_mode: bool = False
    # G's samples exactly symmetric under x -> -x: the sign of the latent's first entry flips
    # the output of G at that entry's absolute value (pipeline.models.gan_symmetry.
    # SignSymmetricGenerator). For data with that symmetry (Ising at zero field, phi^4): in a
    # broken phase G then draws one mode and the flip the other, instead of a continuous G
    # passing between them (fields with |M| near 0 that the data never has).
    g_sign_symmetric: bool = False
    # D exactly invariant under x -> -x too (with g_sign_symmetric only: a symmetric D alone
    # cannot see a G that draws one sign): D'(x) = (D(x) + D(-x)) / 2
    # (pipeline.models.gan_symmetry.SignSymmetricDiscriminator), and WGAN-GP's interpolates join
    # each real sample to its fake flipped to the same sign, so the gradient penalty acts near
    # the modes, not on lines through the M ~ 0 region between them that neither side draws.
    d_sign_symmetric: bool = False
    # MLP D: the minibatch standard deviation (Karras et al. 2018, ProGAN Sec. 3) over groups of
    # this many consecutive samples, one more feature before D's last hidden layer
    # (pipeline.models.gan_features.MinibatchStd): D then compares the spread of its features
    # within a batch of fakes with that within a batch of reals, not only each sample's
    # features. 0 = off; StyleGAN uses 4. data.batch_per_rank must be a multiple of it.
    d_minibatch_std: int = 0
    # Spin lattices only: how G's tanh output y in (-1, 1) becomes spins. sign: D sees y
    # itself and samples are sign(y); real lattices are exactly +-1, so D can tell fakes by
    # their non-saturated sites and G is pushed to saturate (hard, too ordered lattices).
    # bernoulli: y is each site's mean spin; spins are drawn independently given y
    # (P(s = +1) = (1 + y) / 2), D sees the drawn +-1 lattice, and G's gradient passes
    # straight through the draw (Bengio et al. 2013; exact for D linear in s, since E[s | y] = y).
    # Isolated thermal flips then cost G nothing to express. Samples are drawn the same way.
    spin_output: Literal["sign", "bernoulli"] = "sign"
    # Conditional conv G: the label also scales and shifts every stage's features (FiLM),
    # not only G's input (pipeline.models.gan_nets.ConvGenerator).
    g_film: bool = False
    # Conv G: per-site noise maps added at every stage (StyleGAN's noise inputs); the latent
    # then has latent_dim + (number of sites over all stages) entries, all from latent_prior.
    g_noise_inputs: bool = False
    # Conv G: 3x3 conv + ReLU units per upsampling stage (StyleGAN2 uses 2), each with its own
    # FiLM and noise map; > 1 deepens G at every resolution, the finest included.
    g_convs_per_stage: int = 1
    # Spin lattices: weight of a feature-matching term in G's loss (Salimans et al. 2016,
    # Sec. 3.1) on the lattice observables (pipeline.models.gan_features.lattice_observables):
    # per label in the batch, an unbiased estimate of the squared distance between the fakes'
    # and the reals' mean bond correlations (so the energy) and m^2 (see observable_matching).
    # With spin_output=bernoulli the fakes' observables are their exact expectations over the
    # draw given G's means (matched_observables), not the drawn lattice's.
    # 0 = off. Logged as g/observable_matching (can be slightly negative: it is unbiased).
    g_observable_matching: float = 0.0
    # Semi-supervised GAN (Salimans et al. 2016, Sec. 5): a K-class discriminator whose implicit
    # (K+1)-th class is "fake". labelled: every training sample's label is used; unlabelled:
    # none; mixed: a fraction labelled_fraction of samples. Needs class labels in the data.
    semi_supervised: Literal["off", "labelled", "unlabelled", "mixed"] = "off"
    labelled_fraction: float = 0.1  # for semi_supervised == "mixed"
    # Samples whose labels are never used for training, for held-out classification accuracy.
    heldout_fraction: float = 0.1
    # Where the latents h (and WGAN-GP's interpolation weights) come from during training.
    # null: each rank's own RNG (seeded by run.seed and the rank). An int: for every optimizer
    # (micro) step the noise of the WHOLE global batch is drawn from a generator keyed by
    # (latent_seed, phase, step, call within the step) and each rank takes its slice, so the
    # noise does not depend on how the global batch is split over processes; with the same
    # data, 2 ranks x B then train exactly like 1 process x 2B (DDP averages gradients).
    latent_seed: int | None = None

    def validate(self) -> None:
        if self.n_critic < 1:
            raise ConfigError(f"gan.n_critic must be >= 1, got {self.n_critic}")
        if self.latent_dim <= 0:
            raise ConfigError(f"gan.latent_dim must be positive, got {self.latent_dim}")
        if self.lr_g <= 0 or self.lr_d <= 0:
            raise ConfigError(f"gan.lr_g and gan.lr_d must be > 0, got {self.lr_g} and {self.lr_d}")
        if self.betas is not None and not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"gan.betas must lie in [0, 1), got {self.betas}")
        if self.latent_seed is not None and self.latent_seed < 0:
            raise ConfigError(f"gan.latent_seed must be null or a non-negative integer, got {self.latent_seed}")
        if self.gp_weight < 0:
            raise ConfigError(f"gan.gp_weight must be >= 0, got {self.gp_weight}")
        if self.g_convs_per_stage < 1:
            raise ConfigError(f"gan.g_convs_per_stage must be >= 1, got {self.g_convs_per_stage}")
        if self.d_minibatch_std < 0 or self.d_minibatch_std == 1:
            raise ConfigError(f"gan.d_minibatch_std is a group size: 0 (off) or >= 2, got {self.d_minibatch_std}")
        if self.d_minibatch_std and self.semi_supervised != "off":
            raise ConfigError("gan.d_minibatch_std needs gan.semi_supervised=off: the semi-supervised D also "
                              "classifies single samples, which a feature of the whole group would change")
        if self.d_sign_symmetric and not self.g_sign_symmetric:
            raise ConfigError("gan.d_sign_symmetric=true needs gan.g_sign_symmetric=true: a critic invariant under "
                              "x -> -x cannot tell a G that draws one sign only")
        if self.d_head_hidden < 0:
            raise ConfigError(f"gan.d_head_hidden must be >= 0 (0: no hidden layer), got {self.d_head_hidden}")
        if self.g_observable_matching < 0:
            raise ConfigError(f"gan.g_observable_matching must be >= 0, got {self.g_observable_matching}")
        if self.r1_weight < 0:
            raise ConfigError(f"gan.r1_weight must be >= 0, got {self.r1_weight}")
        if self.r1_weight > 0 and self.loss not in ("minimax", "non-saturating"):
            raise ConfigError(
                f"gan.r1_weight is the R1 penalty of the logistic losses ('minimax', 'non-saturating'); "
                f"gan.loss={self.loss!r} has its own (wgan-gp: gan.gp_weight)"
            )
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ConfigError(f"gan.channels must be a non-empty list of positive widths, got {self.channels}")
        if self.semi_supervised != "off":
            if self.conditional:
                raise ConfigError(
                    "gan.semi_supervised needs gan.conditional=false: the K-class discriminator "
                    "classifies real samples itself, G is unconditional (Salimans et al. 2016)"
                )
            if self.loss not in ("minimax", "non-saturating"):
                raise ConfigError(
                    f"gan.semi_supervised needs a logistic loss ('minimax' or 'non-saturating'), "
                    f"got gan.loss={self.loss!r}"
                )
            if not 0.0 < self.heldout_fraction < 1.0:
                raise ConfigError(f"gan.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
            if not 0.0 < self.labelled_fraction <= 1.0 - self.heldout_fraction:
                raise ConfigError(
                    f"gan.labelled_fraction must be in (0, 1 - gan.heldout_fraction = "
                    f"{1.0 - self.heldout_fraction:g}], got {self.labelled_fraction}"
                )

    def reads_labels(self, meta: "DataMeta") -> bool:
        """Whether training reads each sample's label: a conditional or semi-supervised GAN."""
        return self.conditional or self.semi_supervised != "off"

    def inert_keys(self, meta: "DataMeta") -> dict[str, str]:
        """Keys of this section that do not act on the model for this data: none (an option a
        GAN cannot use on the data is an error in check_data)."""
        return {}

    def data_warnings(self, meta: "DataMeta") -> list[str]:
        """Settings that train on this data but are known to go wrong: none for the GAN (what
        cannot work is an error in check_data)."""
        return []

    def check_data(self, meta: "DataMeta") -> tuple[str, str, int]:
        """(arch, padding, number of D outputs) for data described by ``meta``, with the
        ``auto`` choices resolved; ConfigError when the config does not fit the data."""
        shape = tuple(meta.sample_shape)
        grid = len(shape) == 3 or (len(shape) in (2, 4) and meta.boundary is not None)
        arch = self.arch if self.arch != "auto" else ("conv" if grid else "mlp")
        if arch == "conv" and len(shape) not in (2, 3, 4):
            raise ConfigError(f"gan.arch='conv' needs samples of shape (C, L), (C, H, W) or (C, D, H, W); "
                              f"this data has {shape}")
        periodic = meta.data_kind == "spins" or meta.boundary == "periodic"
        padding = self.padding if self.padding != "auto" else ("circular" if periodic else "zeros")
        if arch == "conv":
            self._check_conv_sizes(shape)
        self._check_labels(meta)
        self._check_parts(meta, arch, padding)
        return arch, padding, (meta.num_classes if self.semi_supervised != "off" else 1)

    def _check_conv_sizes(self, shape: tuple[int, ...]) -> None:
        """The conv G upsamples by 2 once per entry of gan.channels, and D downsamples as often:
        every spatial size must be a multiple of 2^len(channels) (pipeline.models.gan_nets)."""
        n, spatial = len(self.channels), shape[1:]
        if all(s % 2**n == 0 for s in spatial):
            return
        fit = max(k for k in range(0, 16) if all(s % 2**k == 0 for s in spatial))
        way_out = (f"use at most {fit} entries in gan.channels (e.g. {self.channels[:fit]})" if fit >= 1
                   else "no number of stages fits: use gan.arch=mlp")
        raise ConfigError(
            f"gan.channels={self.channels} gives the conv networks {n} stride-2 stages, which need every spatial "
            f"size divisible by {2**n}; the data's samples are {shape}: {way_out}")

    def _check_labels(self, meta: "DataMeta") -> None:
        if self.conditional and meta.label_kind == "none":
            raise ConfigError(
                "gan.conditional=true but the data has no labels (its manifest says label_kind='none'); "
                "set gan.conditional=false, or write the shards with labels (e.g. `pipeline shards npy --labels`)"
            )
        if self.conditional and meta.label_kind == "class" and not meta.num_classes:
            raise ConfigError("gan.conditional=true with class labels needs num_classes in the data's manifest")
        if self.semi_supervised != "off" and (meta.label_kind != "class" or not meta.num_classes
                                              or meta.num_classes < 2):
            raise ConfigError(
                f"gan.semi_supervised={self.semi_supervised!r} needs class labels with num_classes >= 2; "
                f"this data has label_kind={meta.label_kind!r}, num_classes={meta.num_classes}"
            )

    def _check_parts(self, meta: "DataMeta", arch: str, padding: str) -> None:
        """The opt-in parts that need spin lattices or the conv networks."""
        shape = tuple(meta.sample_shape)
        if self.spin_output != "sign" and meta.data_kind != "spins":
            raise ConfigError(f"gan.spin_output={self.spin_output!r} needs spin data; this data is "
                              f"{meta.data_kind!r} (use gan.spin_output=sign)")
        if self.g_noise_inputs and arch != "conv":
            raise ConfigError(f"gan.g_noise_inputs=true needs the conv networks (gan.arch={arch!r})")
        if self.d_head_hidden and arch != "conv":
            raise ConfigError(f"gan.d_head_hidden > 0 needs the conv networks (gan.arch={arch!r}); the MLP "
                              f"discriminator's hidden widths are gan.channels")
        if self.d_spectral_features and (len(shape) < 2 or padding != "circular"):
            raise ConfigError(f"gan.d_spectral_features=true needs periodic fields [C, *spatial] (circular padding: "
                              f"spins, or a manifest with boundary=periodic); got samples {shape}, padding {padding!r}")
        if self.g_sign_symmetric and meta.data_kind == "levels":
            raise ConfigError("gan.g_sign_symmetric=true makes G's samples symmetric under x -> -x in model space; "
                              "for 'levels' data that would map level i onto level k-1-i, not a symmetry of the data "
                              "(spins and continuous fields only)")
        if self.d_minibatch_std and arch != "mlp":
            raise ConfigError(f"gan.d_minibatch_std > 0 needs the MLP networks (gan.arch=mlp); got gan.arch={arch!r}")
        if self.g_zero_mode and arch != "conv":
            raise ConfigError(f"gan.g_zero_mode=true needs the conv networks (gan.arch={arch!r})")
        if self.g_convs_per_stage != 1 and arch != "conv":
            raise ConfigError(f"gan.g_convs_per_stage > 1 needs the conv networks (gan.arch={arch!r})")
        if self.g_film and (not self.conditional or arch != "conv"):
            raise ConfigError(f"gan.g_film=true needs gan.conditional=true and the conv networks (gan.arch={arch!r})")
        if self.g_observable_matching > 0 and (meta.data_kind != "spins" or len(shape) != 3 or shape[0] != 1):
            raise ConfigError(f"gan.g_observable_matching > 0 needs spin lattices of shape (1, H, W); this data "
                              f"is {meta.data_kind!r} of shape {shape}")
        if self.d_lattice_observables and (meta.data_kind != "spins" or arch != "conv"):
            raise ConfigError(
                f"gan.d_lattice_observables=true needs spin lattices (data kind 'spins', shape (1, H, W)) and "
                f"the conv networks; this data is {meta.data_kind!r} of shape {shape} with gan.arch={arch!r}"
            )
