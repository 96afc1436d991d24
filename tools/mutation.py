"""Mutation testing of one module of the jitted core, with mutmut 3 (not part of CI).

Usage (from the repository root, in the project's virtual environment)::

    python tools/mutation.py _stats                       # the whole module
    python tools/mutation.py _clipping --functions clip_scale 'ZScoreClip.*'
    python tools/mutation.py _stats --only survivors      # re-run last run's survivors
    python tools/mutation.py _guard --mutants 'x__decide__mutmut_1[0-3]?'  # some mutants
    python tools/mutation.py --list                       # modules and their tests
    python tools/mutation.py _stats --resume              # finish an interrupted run
    python tools/mutation.py _stats --report              # print the last summary again

What it does:

1. copies the working tree's ``optax_gradhealth/``, ``tests/``, ``examples/``, ``docs/``,
   ``README.md``, ``conftest.py`` and ``pyproject.toml`` into ``.mutation/<module>/`` (git-ignored):
   the checkout itself is never touched, and uncommitted tests are included;
2. appends a ``[tool.mutmut]`` table for that module to the *copy* of pyproject.toml
   (only that module is mutated; the test subset is ``MODULES[module]``);
3. runs ``mutmut run`` there: every mutant runs, in a process forked from a fork server
   that has imported jax, numpy, optax, torch and pytest but run nothing (jax's
   thread pools and compile caches are never forked), the subset's tests that call the
   mutated function (mutmut records which), stopping at the first failure;
4. prints killed / survived / timeout counts and every survivor's diff, marks survivors
   listed in ``EQUIVALENT`` (with the reason), and writes
   ``.mutation/<module>/summary.json``.

The exit status is 0 when every mutant is killed or listed as equivalent, 1 otherwise.
Needs ``pip install mutmut==3.8.1`` (see docs/testing.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "optax_gradhealth"
MUTMUT_VERSION = "3.8.1"
INSTALL_HINT = f"mutmut is not installed: pip install mutmut=={MUTMUT_VERSION}"


@dataclasses.dataclass(frozen=True)
class Target:
    """What to mutate in a module and which tests judge the mutants.

    Attributes:
      tests: pytest arguments selecting the fast subset (files, node ids, ``-k`` ...).
        mutmut runs, for each mutant, only those of them that call the mutated function.
      functions: default restriction to some functions (same syntax as ``--functions``);
        empty: every function of the module.
    """

    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()


MODULES: dict[str, Target] = {
    "_stats": Target(tests=("tests/test_stats.py",)),
    "_clipping": Target(tests=("tests/test_clipping.py", "tests/test_clip_modes.py")),
    "_skip": Target(tests=("tests/test_skip.py",)),
    "_loss_scale": Target(tests=("tests/test_loss_scale.py",)),
    # The guard's pieces (_decide, _apply_inner, _record, GuardConfig) are judged by the
    # guard's own tests; restrict a run with --functions to the piece being changed.
    "_guard": Target(
        tests=(
            "tests/test_guard.py",
            "tests/test_guard_promises.py",
            "tests/test_hyperparams.py",
            "tests/test_update_health.py",
            "tests/test_loss_scale.py",  # the guard inside the loss scale (keep_bookkeeping, unscale)
            # each metric's dtype by its declared kind, init's state included (the file's other
            # tests read README.md and docs/, which the work dir does not hold)
            "tests/test_catalogue.py::test_declared_kinds_match_the_arrays_metrics_returns",
            # a clip mode passed as `clip` (chained between the decision and `inner`)
            "tests/test_clip_modes.py::test_adagc_clip_inside_the_guard_sees_accepted_steps_only_and_survives_a_reset",
        ),
    ),
    # The detectors' rules (SpikeRule, NormWindow, the audit's scores), pure jitted functions:
    # judged by their own tests and the guard's re-baselining tests.
    "_detectors": Target(tests=("tests/test_detectors.py", "tests/test_rebaseline.py")),
    "_cross_device": Target(
        tests=(
            "tests/test_alarms.py",  # host side: Alarm, describe_outlier, cross_device_alarms
            "tests/test_cross_device.py",
            "tests/test_diagnose.py",  # gh.diagnose words its outlier findings with describe_outlier
        ),
    ),
}

# Surviving mutants that change no observable behaviour: mutant name -> (a fragment of the
# mutated line, so that an entry made stale by an edit of the function is noticed; reason).
# Filled in from the runs recorded in docs/testing.md.
_NAMES_CACHE_ONLY = "only the names cache changes (a lookup misses, or one more entry fits): the same names"
_JAX_010_AVALS = (
    "every aval of jax 0.10 has .mat.varying (empty outside shard_map): the defaults for a jax without "
    "them are never taken"
)
_PCAST_NO_AXES = "lax.pcast over an empty tuple of axes returns the value unchanged, with the same varying axes"
_ONE_AXIS_TUPLE = "lax.axis_index of a one-name tuple is that of the name"
_ONE_AXIS_TUPLE_SIZE = "lax.axis_size of a one-name tuple is that of the name"
_ZERO_OVER_ZERO = (
    "every numerator is 0 where its denominator is (a zero norm makes the dot, the std, the Gram entry and the "
    "agreement's numerator 0; a NaN denominator fails both tests): 0 / 1.0 is the 0.0 of the fill"
)
_FLOAT_SPELLING = "float() reads the name case-insensitively: the same float"
_DIAGONAL_FALSE = (
    "the diagonal of the pair matrices is False by construction (a device is not its own duplicate), so the "
    "upper triangle with or without it names the same pairs"
)
_MESH_AXIS_NAMES = "every abstract mesh of jax 0.10 has axis_names (empty outside one): the default is never read"
_ONE_AXIS_TUPLE_PSUM = "lax.psum over a one-name tuple of axes is over the name"
_DEFAULT_FLOAT = (
    "the default float dtype is float32 without x64; with x64 these values meet only what the state's final "
    "cast to each field's init dtype returns to float32"
)
_SPLIT_SALTS = (
    "the parts of a split leaf still get distinct salts (another function of the shard index on the same drawn "
    "salt): each part is still hashed and sketched independently, which is all the audit relies on"
)
_EVERY_LEAF_SPLIT = (
    "tracked=None takes every leaf as split over the sharded axes (as pmap does): a replicated leaf's "
    "fingerprint becomes the sum of its per-part hashes, the same on every data device for the same leaf, and "
    "fingerprints are only compared between data devices"
)
_SAME_CONSTANT_FINGERPRINT = (
    "no float leaves (or no params): every device gets the same constant fingerprint, 0 or 1 alike; duplicates "
    "also need a non-zero norm, and desync compares devices with each other"
)
_PARAM_SALT = (
    "another constant keeps the parameters' salts apart from the gradients' (their fingerprints are never compared)"
)
_CPU_MATMUL = (
    "XLA:CPU multiplies float32 matrices in float32 at every precision setting (HIGHEST is there for GPU and "
    "TPU, whose default may use TF32 or bf16 passes: not observable on the CPU the tests run on)"
)
EQUIVALENT: dict[str, tuple[str, str]] = {
    # _stats
    "optax_gradhealth._stats.x__names_of_treedef__mutmut_1": ("names = None", _NAMES_CACHE_ONLY),
    "optax_gradhealth._stats.x__names_of_treedef__mutmut_2": ("_NAMES_CACHE.get(None)", _NAMES_CACHE_ONLY),
    "optax_gradhealth._stats.x__names_of_treedef__mutmut_7": (
        "[1] * treedef.num_leaves",
        "the dummy tree's leaf values are never read: names come from the key paths only",
    ),
    "optax_gradhealth._stats.x__names_of_treedef__mutmut_11": ("<= 256", _NAMES_CACHE_ONLY),
    "optax_gradhealth._stats.x__names_of_treedef__mutmut_12": ("< 257", _NAMES_CACHE_ONLY),
    "optax_gradhealth._stats.x__names_of_treedef__mutmut_13": ("_NAMES_CACHE[treedef] = None", _NAMES_CACHE_ONLY),
    "optax_gradhealth._stats.x__leaf_sum_of_squares__mutmut_8": (
        "dtype=None",
        "the summand is already in the accumulation dtype, so jnp.sum keeps it",
    ),
    "optax_gradhealth._stats.x__leaf_sum_of_squares__mutmut_10": (
        "scale), )",
        "the summand is already in the accumulation dtype, so jnp.sum keeps it",
    ),
    "optax_gradhealth._stats.x__grad_stats__mutmut_5": (
        "or True",
        "jnp.asarray of every leaf: arrays are unchanged, a Python int becomes an int32 array, still ignored",
    ),
    "optax_gradhealth._stats.x__grad_stats__mutmut_109": (
        "jnp.where(finite_each, norms, 1.0)",
        "the fill replaces a non-finite leaf's norm, and then the whole result is discarded (finite is False)",
    ),
    "optax_gradhealth._stats.x__ordinary__mutmut_3": (
        "total > _TINY_SUM_OF_SQUARES",
        "only a total of exactly float32(1e-30) changes branch, and both branches give its norm to rounding",
    ),
    "optax_gradhealth._stats.x__norm_of_norms__mutmut_7": (
        "jnp.clip(exponent, None, 100)",
        "a normal float32 norm has an exponent >= -125, whose 2**-e and 2**e are normal: the -100 bound only "
        "matters for subnormal norms, which XLA reads as zero",
    ),
    "optax_gradhealth._stats.x__norm_of_norms__mutmut_13": (
        "jnp.clip(exponent, -101, 100)",
        "any lower bound from -125 to -1 keeps 2**-e and 2**e normal for every normal float32 norm",
    ),
    "optax_gradhealth._stats.x__norm_of_norms__mutmut_14": (
        "jnp.clip(exponent, -100, 101)",
        "any upper bound from 1 to 126 keeps 2**-e and 2**e normal, and the scaled squares far from overflow",
    ),
    # _clipping
    "optax_gradhealth._clipping.x_clip_scale__mutmut_4": (
        "norm >= threshold",
        "at norm == threshold the factor threshold / norm is exactly 1 (IEEE division): same update, not counted",
    ),
    "optax_gradhealth._clipping.x_clip_scale__mutmut_12": (
        "jnp.where(clip, norm, 2.0)",
        "the placeholder divisor of an unclipped step only feeds values that where(clip, ..., 1.0) discards",
    ),
    "optax_gradhealth._clipping.x_clip_scale__mutmut_20": (
        "direct > _F32_TINY",
        "at threshold / norm == float32 tiny both factorisations give the same product to rounding",
    ),
    "optax_gradhealth._clipping.x_ring_write__mutmut_3": (
        "dtype=None",
        "an arange of another integer dtype compares with the integer slot exactly",
    ),
    "optax_gradhealth._clipping.x_ring_write__mutmut_5": (
        "buffer.shape[0], )",
        "an arange of another integer dtype compares with the integer slot exactly",
    ),
    # _loss_scale
    "optax_gradhealth._loss_scale.x_dynamic_loss_scale__mutmut_162": (
        "inputs=None,",
        "`inputs` only tells an eager call from a traced one; without it the update is traced and "
        "re-evaluated even eagerly, which gives the same values",
    ),
    "optax_gradhealth._loss_scale.x_dynamic_loss_scale__mutmut_165": (
        ")",  # the `inputs=` line removed: only the closing parenthesis is added
        "`inputs` only tells an eager call from a traced one; without it the update is traced and "
        "re-evaluated even eagerly, which gives the same values",
    ),
    # _guard
    "optax_gradhealth._guard.x__decide__mutmut_101": (
        ".astype(None))",
        "the count of spikes in the window is only compared with reset_after: a sum of the flags in another "
        "dtype gives the same comparison",
    ),
    "optax_gradhealth._guard.x__apply_inner__mutmut_24": (
        '"XXskipXX"',
        "with spike_action='skip' a reset step is a spike, so it is skipped: the update that reads the "
        "re-initialised state instead of the old one is discarded, and the kept state is the reset one either way",
    ),
    "optax_gradhealth._guard.x__apply_inner__mutmut_25": (
        '"SKIP"',
        "with spike_action='skip' a reset step is a spike, so it is skipped: the update that reads the "
        "re-initialised state instead of the old one is discarded, and the kept state is the reset one either way",
    ),
    "optax_gradhealth._guard.x__output_sums__mutmut_36": (
        "seen.get(x.shape, 1)",
        "the pairing starts at another update leaf of the shape: every state leaf is still paired with one, "
        "so every one is checked",
    ),
    "optax_gradhealth._guard.x__output_sums__mutmut_44": (
        "count - 1",
        "the pairing walks the update leaves of the shape backwards (Python's modulo of a negative count is "
        "an index): every state leaf is still paired with one, so every one is checked",
    ),
    "optax_gradhealth._guard.x__output_sums__mutmut_60": (
        "_abs_squared(u, None, None)",
        "the default float dtype instead of the accumulation dtype: the same float32 for fp16, bf16 and float32 "
        "leaves under x32 and float64 for float64 leaves under x64; only a float32 leaf under x64 would be summed "
        "in float64 before the cast to float32, a rounding no float32 tolerance can tell",
    ),
    "optax_gradhealth._guard.x__output_sums__mutmut_92": (
        "dtype=None",
        "the squares are already in the accumulation dtype, which jnp.sum keeps",
    ),
    "optax_gradhealth._guard.x__output_sums__mutmut_94": (
        "jnp.sum(squares, )",
        "the squares are already in the accumulation dtype, which jnp.sum keeps",
    ),
    "optax_gradhealth._guard.x__output_sums__mutmut_104": (
        "jnp.zeros((1,), jnp.float32)",
        "an empty update given one zero sum: its norm is still 0, and the per-leaf ratios, whose length no longer "
        "matches the gradient's leaves, are replaced by the gradient-shaped zeros (_update_health)",
    ),
    "optax_gradhealth._guard.x__output_sums__mutmut_123": (
        "if sums else jnp.zeros((1,), jnp.float32)",
        "params without leaves (and so an update without leaves) given one zero sum: param/norm is still 0, "
        "and the per-leaf ratios against an empty update broadcast to length 0 either way (_update_health)",
    ),
    # (numbered after the removal of build's dead `update_health=True` default, formerly its mutant 1)
    "optax_gradhealth._guard.xǁGuardConfigǁbuild__mutmut_171": (
        "ring_size=2 if reset_after is None",
        "with reset_after=None the reset ring is never written or read (_decide skips it): its length only "
        "sizes an unused buffer",
    ),
    "optax_gradhealth._guard.x__ratio__mutmut_17": (
        "jnp.where(ok, den, 2.0)",
        "the placeholder divisor of a zero parameter norm only feeds values that where(ok, ..., 0.0) discards",
    ),
    # _cross_device (host side)
    "optax_gradhealth._cross_device.x__bound_axes_hint__mutmut_3": (
        "names = None",
        "only when jax has no get_abstract_mesh (the except branch): None and () are both falsy, the same hint",
    ),
    "optax_gradhealth._cross_device.x__vma__mutmut_8": ('getattr(aval, "mat", )', _JAX_010_AVALS),
    "optax_gradhealth._cross_device.x__vma__mutmut_16": ('getattr(mat, "varying", )', _JAX_010_AVALS),
    "optax_gradhealth._cross_device.x__vma__mutmut_19": ("(varying is None) and False", _JAX_010_AVALS),
    "optax_gradhealth._cross_device.x__vma_checked__mutmut_5": ("(len(axes) > 1) or True", _ONE_AXIS_TUPLE),
    "optax_gradhealth._cross_device.x__vma_checked__mutmut_6": ("len(axes) >= 1", _ONE_AXIS_TUPLE),
    "optax_gradhealth._cross_device.x__vma_checked__mutmut_9": (
        "bool(varying) or set(axes)",
        "lax.axis_index over the data axes varies over exactly those axes (shard_map with check_vma) or over "
        "none (pmap, check_vma=False): `set(axes) <= varying` is True exactly when varying is non-empty",
    ),
    "optax_gradhealth._cross_device.x__match_vma__mutmut_10": ("if (missing) or True", _PCAST_NO_AXES),
    "optax_gradhealth._cross_device.x__axis_size__mutmut_4": ("(len(axes) > 1) or True", _ONE_AXIS_TUPLE_SIZE),
    "optax_gradhealth._cross_device.x__axis_size__mutmut_5": ("len(axes) >= 1", _ONE_AXIS_TUPLE_SIZE),
    "optax_gradhealth._cross_device.x__safe_div__mutmut_7": ("jnp.where(b >= 0,", _ZERO_OVER_ZERO),
    "optax_gradhealth._cross_device.x__safe_div__mutmut_16": (
        "jnp.where(b >= 0, b, 1.0)",
        "the quotient by a zero denominator (0/0 or a/0) is discarded by the outer where(b > 0, ..., 0.0)",
    ),
    "optax_gradhealth._cross_device.x__safe_div__mutmut_18": (
        "jnp.where(b > 0, b, 2.0)",
        "the placeholder divisor only feeds values that the outer where(b > 0, ..., 0.0) discards",
    ),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_11": (
        "allow_empty=None",
        "None is falsy, as False: an empty axis_name is still rejected",
    ),
    "optax_gradhealth._cross_device.x__to_varying__mutmut_11": ("if (missing) or True", _PCAST_NO_AXES),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_198": ('"axis_names", None)', _MESH_AXIS_NAMES),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_201": ('"axis_names", )', _MESH_AXIS_NAMES),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_376": (
        "axes = None",
        "no sharded axes: None is falsy as () is, so no leaf is psum-ed and the key is never read",
    ),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_388": ("salt & sketch.mix32", _SPLIT_SALTS),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_390": (".astype(jnp.uint32) - 1)", _SPLIT_SALTS),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_394": ("(len(axes) > 1) or True", _ONE_AXIS_TUPLE),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_395": ("len(axes) >= 1", _ONE_AXIS_TUPLE),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_420": ("(len(axes) > 1) or True", _ONE_AXIS_TUPLE_PSUM),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_421": ("len(axes) >= 1", _ONE_AXIS_TUPLE_PSUM),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_489": ("jnp.zeros((), None)", _DEFAULT_FLOAT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_491": ("f32_zero = jnp.zeros((), )", _DEFAULT_FLOAT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_566": (
        "(jnp.iscomplexobj(g)) or True",
        "a real leaf cast to complex64: Re(g conj(m)) of real g and m is g * m exactly",
    ),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_597": ("jnp.zeros((dim + 1,), None)", _DEFAULT_FLOAT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_599": ("jnp.zeros((dim + 1,), )", _DEFAULT_FLOAT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_601": (
        "(dim + 2,)",
        "a tree without float leaves gathers rows of zeros: one more zero column changes no Gram entry or norm",
    ),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_613": ("salt), None)", _EVERY_LEAF_SPLIT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_626": (
        "sketch.u32(1) if grad_fp",
        _SAME_CONSTANT_FINGERPRINT,
    ),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_633": ("None,", _EVERY_LEAF_SPLIT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_643": ("salt & sketch.u32(0x5BD1E995)", _PARAM_SALT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_645": ("1540483478", _PARAM_SALT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_650": (
        "sketch.u32(1) if param_fp",
        _SAME_CONSTANT_FINGERPRINT,
    ),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_682": ("precision=None", _CPU_MATMUL),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_685": ("sketches.T, )", _CPU_MATMUL),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_723": (
        "max(k * (k - 1), 2)",
        "k * (k - 1) is 0 only for K = 1, whose sum of off-diagonal cosines is 0: 0 / 2 = 0 / 1",
    ),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_736": (
        "ints[:, 2]",
        "jnp clamps a static out-of-range index: column 2 of the [K, 2] fingerprints is column 1",
    ),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_826": ("jnp.ones((), None)", _DEFAULT_FLOAT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_828": ("jnp.ones((), )", _DEFAULT_FLOAT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_865": ("jnp.nan, None)", _DEFAULT_FLOAT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_868": ("jnp.nan, )", _DEFAULT_FLOAT),
    "optax_gradhealth._cross_device.x_cross_device__mutmut_931": (
        "audited.astype(None)",
        "the audit count is added as float32 and cast back to int32: exact below 2**24 audits "
        "(8e9 steps on the default schedule)",
    ),
    "optax_gradhealth._cross_device.x_describe_outlier__mutmut_22": ('float("NAN")', _FLOAT_SPELLING),
    "optax_gradhealth._cross_device.x_describe_outlier__mutmut_120": ('float("INF")', _FLOAT_SPELLING),
    "optax_gradhealth._cross_device.x_cross_device_alarms__mutmut_123": ("np.triu(pairs, )", _DIAGONAL_FALSE),
    "optax_gradhealth._cross_device.x_cross_device_alarms__mutmut_165": ("np.triu(near & ~exact, )", _DIAGONAL_FALSE),
    "optax_gradhealth._cross_device.x_cross_device_alarms__mutmut_152": (
        "np.zeros_like(None)",
        "without the exact pairs, ~zeros_like(None) is the object -1 (every bit set): near & -1 keeps every "
        "flagged pair, as near & ~False does",
    ),
    "optax_gradhealth._cross_device.x_cross_device_alarms__mutmut_180": (
        "cos.shape[1]",
        "the pairwise cosine matrix is square",
    ),
    "optax_gradhealth._cross_device.x_cross_device_alarms__mutmut_181": (
        "= None",
        "None written into a bool array is False",
    ),
    # _skip
    "optax_gradhealth._skip.x__evaluate__mutmut_15": (
        "if v not in subst]",
        "inlining a call is evaluating its jaxpr: a call with no substituted output gives the same values "
        "inlined, and one whose every output is substituted gives them selected after the call, which on an "
        "applied step is the identity and on a skipped one keeps every state output anyway",
    ),
    "optax_gradhealth._skip.x__evaluate__mutmut_75": (
        'getattr(eqn, "ctx", )',
        "every jaxpr equation of jax 0.10 has a ctx attribute: getattr without a default finds it",
    ),
    "optax_gradhealth._skip.x__evaluate__mutmut_79": (
        "(ctx is not None) or True",
        "every jaxpr equation of jax 0.10 carries a context (JaxprEqn.ctx is never None)",
    ),
    # _detectors
    "optax_gradhealth._detectors.x_cusum__mutmut_10": (
        ".astype(None)",
        "evidence and score are float32 (the audit's state and scores): the clip is float32 already",
    ),
    "optax_gradhealth._detectors.xǁSpikeRuleǁdip__mutmut_22": (
        "(log_norm <= floor)",
        "a log-norm exactly on the mirror bound, a float32 computed from the window: measure zero",
    ),
    "optax_gradhealth._detectors.xǁSpikeRuleǁnear__mutmut_14": (
        "<= half",
        "a log-norm exactly half-way to the bound: measure zero",
    ),
    "optax_gradhealth._detectors.x_spike_action__mutmut_42": (
        "jnp.sum(..., dtype=None)",
        "a sum of bools is int32 already (int64 under x64), compared with an integer only",
    ),
    "optax_gradhealth._detectors.x_spike_action__mutmut_44": (
        "jnp.sum(...) without dtype",
        "a sum of bools is int32 already (int64 under x64), compared with an integer only",
    ),
}

# Imported once by the fork server before it forks a worker per mutant: importing runs
# no computation, so no jax thread pool or compilation cache is inherited.
PRELOAD = ("numpy", "jax", "jax.numpy", "optax", "chex", "flax", "hypothesis", "torch", "pytest")

STATUS_OF_EXIT_CODE = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "timeout",
    37: "caught by type check",
    -11: "segfault",
    -9: "segfault",
    None: "not checked",
}


def function_patterns(module: str, functions: list[str]) -> list[str]:
    """mutmut mutant-name patterns for ``name`` (a function) or ``Class.method``."""
    patterns = []
    for name in functions:
        if "." in name:
            cls, method = name.split(".", 1)
            patterns.append(f"{PACKAGE}.{module}.xǁ{cls}ǁ{method}__mutmut_*")
        else:
            patterns.append(f"{PACKAGE}.{module}.x_{name}__mutmut_*")
    return patterns


def mutmut_table(module: str, target: Target, timeout_multiplier: float, timeout_constant: float) -> str:
    tests = ", ".join(json.dumps(t) for t in target.tests)
    return f"""

[tool.mutmut]
source_paths = ["{PACKAGE}/"]
only_mutate = ["{PACKAGE}/{module}.py"]
pytest_add_cli_args_test_selection = [{tests}]
pytest_add_cli_args = [
    "-p", "no:doctest", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore::pytest.PytestConfigWarning",
]
also_copy = ["conftest.py", "examples/", "docs/", "README.md"]
process_isolation = "forkserver"
forkserver_warmup = "import"
preload_modules_file = "preload.txt"
timeout_multiplier = {timeout_multiplier}
timeout_constant = {timeout_constant}
use_git_change_detection = false
"""


def prepare(work: pathlib.Path, module: str, target: Target, args: argparse.Namespace) -> None:
    if (work / "summary.json").exists():  # kept beside the work dir: .mutation/<module>.previous.json
        shutil.copy2(work / "summary.json", work.parent / f"{module}.previous.json")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    shutil.copytree(ROOT / PACKAGE, work / PACKAGE, ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    shutil.copytree(ROOT / "examples", work / "examples", ignore=ignore)  # tests run some examples
    shutil.copy2(ROOT / "conftest.py", work / "conftest.py")
    # some tests read the docs they check against (test_diagnose's playbook, test_catalogue)
    shutil.copytree(ROOT / "docs", work / "docs", ignore=shutil.ignore_patterns("_build"))
    shutil.copy2(ROOT / "README.md", work / "README.md")
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject += mutmut_table(module, target, args.timeout_multiplier, args.timeout_constant)
    (work / "pyproject.toml").write_text(pyproject)
    (work / "preload.txt").write_text("\n".join(PRELOAD) + "\n")


def read_results(work: pathlib.Path, module: str) -> dict[str, dict]:
    meta = json.loads((work / "mutants" / PACKAGE / f"{module}.py.meta").read_text())
    out = {}
    for name, code in meta["exit_code_by_key"].items():
        out[name] = {
            "status": STATUS_OF_EXIT_CODE.get(code, "suspicious"),
            "exit_code": code,
            "duration_s": meta.get("durations_by_key", {}).get(name),
        }
    return out


def diff_of(work: pathlib.Path, module: str, name: str) -> str:
    """The mutant's diff (``mutmut show``), computed in this process when mutmut allows."""
    cwd = os.getcwd()
    try:
        os.chdir(work)
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        return get_diff_for_mutant(name, path=f"{PACKAGE}/{module}.py").strip()
    except Exception:  # another mutmut version: ask its command line
        result = subprocess.run(["mutmut", "show", name], cwd=work, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
        return "\n".join(lines).strip() or result.stderr.strip()
    finally:
        os.chdir(cwd)


def changed_lines(diff: str) -> list[str]:
    return [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]


def run_mutmut(
    work: pathlib.Path, module: str, target: Target, names: list[str], args: argparse.Namespace
) -> float | None:
    """Runs mutmut in ``work`` (a fresh copy unless ``--resume``); returns the wall time."""
    if not (args.resume and (work / "mutants").exists()):
        prepare(work, module, target, args)
    else:  # resuming: mutants already judged in this work dir are not run again
        checked = {k for k, v in read_results(work, module).items() if v["status"] != "not checked"}
        remaining = [n for n in names if n not in checked]
        if names and not remaining:
            return 0.0
        names = remaining
    env = dict(os.environ, CI="1")  # conftest.py: derandomised hypothesis, reproducible runs
    # A persistent compilation cache shared by every mutant: most of a test's time is XLA
    # compiling, and a mutant that leaves a program's HLO unchanged (every equivalent mutant,
    # the tests' own helpers) reuses the compiled program. The key is the HLO without source
    # locations, so a mutant's other line numbers do not miss it; a changed program compiles.
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(work / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    command = ["mutmut", "run", "--max-children", str(args.max_children), *names]
    print(f"[mutation] {module}: {' '.join(target.tests)} (in {work.relative_to(ROOT)})", flush=True)
    start = time.monotonic()
    with open(work / "mutmut.log", "a" if args.resume else "w") as log:
        returncode = subprocess.run(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        print((work / "mutmut.log").read_text()[-4000:])
        print(f"[mutation] mutmut run failed (exit {returncode}); log: {work / 'mutmut.log'}", file=sys.stderr)
        return None
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", help=f"one of {', '.join(MODULES)}")
    parser.add_argument("--list", action="store_true", help="list the modules and their test subsets")
    parser.add_argument("--functions", nargs="+", default=None, help="only these functions (or Class.method)")
    parser.add_argument(
        "--mutants",
        nargs="+",
        default=None,
        help="only these mutants: mutmut names or fnmatch patterns, with or without the "
        "'optax_gradhealth.<module>.' prefix (e.g. 'x__record__mutmut_1??')",
    )
    parser.add_argument("--only", choices=["survivors"], help="re-run only the previous run's survivors")
    parser.add_argument("--tests", nargs="+", help="override the module's test subset (e.g. to confirm kills fast)")
    parser.add_argument("--resume", action="store_true", help="keep the work dir: run only unchecked mutants")
    parser.add_argument("--report", action="store_true", help="summarise the last run again (no run)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants run in parallel (default 2)")
    parser.add_argument("--timeout-multiplier", type=float, default=4.0)
    parser.add_argument("--timeout-constant", type=float, default=15.0)
    args = parser.parse_args(argv)

    if args.list or not args.module:
        for name, target in MODULES.items():
            only = f"  [only {', '.join(target.functions)}]" if target.functions else ""
            print(f"{name:14s} {' '.join(target.tests)}{only}")
        return 0 if args.list else 2
    module = args.module if args.module.startswith("_") else f"_{args.module}"
    if module not in MODULES:
        parser.error(f"unknown module {args.module!r}; known: {', '.join(MODULES)}")
    if shutil.which("mutmut") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2

    target = MODULES[module]
    if args.tests:
        target = dataclasses.replace(target, tests=tuple(args.tests))
    work = ROOT / ".mutation" / module
    summary_path = work / "summary.json"
    names: list[str] = []
    previous: dict = {}
    if args.only == "survivors":
        if not summary_path.exists():
            parser.error(f"no previous run: {summary_path} is missing")
        previous = json.loads(summary_path.read_text())
        names = [s["name"] for s in previous["survivors"]]
        if not names:
            print("the previous run left no survivors")
            return 0
    elif args.mutants:
        prefix = f"{PACKAGE}.{module}."
        names = [m if m.startswith(prefix) else prefix + m for m in args.mutants]
    else:
        names = function_patterns(module, list(args.functions or target.functions))

    if args.report:
        previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        runtime = previous.get("runtime_s") or 0.0
        names = previous.get("filter", names)
    else:
        runtime = run_mutmut(work, module, target, names, args)
        if runtime is None:
            return 2

    results = read_results(work, module)
    if names:
        results = {k: v for k, v in results.items() if any(k == n or fnmatch.fnmatch(k, n) for n in names)}
    if args.only == "survivors":
        # The re-run mutants' new verdicts over the previous run's: the whole module again.
        results = {**previous["mutants"], **results}
    counts: dict[str, int] = {}
    for value in results.values():
        counts[value["status"]] = counts.get(value["status"], 0) + 1
    survivors, equivalent, stale = [], [], []
    for name, value in sorted(results.items()):
        if value["status"] in ("killed", "caught by type check", "not checked"):
            continue
        diff = diff_of(work, module, name)
        entry = {"name": name, "status": value["status"], "diff": diff}
        known = EQUIVALENT.get(name)
        if known and value["status"] == "survived":
            fragment, reason = known
            if any(fragment in line for line in changed_lines(diff)):
                equivalent.append({**entry, "reason": reason})
                continue
            stale.append(name)
        survivors.append(entry)

    total = len(results)
    killed = counts.get("killed", 0) + counts.get("caught by type check", 0)
    summary = {
        "module": module,
        "date": datetime.date.today().isoformat(),
        "tool": f"mutmut {MUTMUT_VERSION}",
        "command": f"python tools/mutation.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "tests": list(target.tests),
        "filter": names,
        "runtime_s": round(runtime, 1),
        "previous_runtime_s": previous.get("runtime_s"),
        "total": total,
        "killed": killed,
        "counts": counts,
        "equivalent": equivalent,
        "survivors": survivors,
        "stale_equivalence_entries": stale,
        "score_killed_over_non_equivalent": round(killed / max(total - len(equivalent), 1), 4),
        "mutants": results,
    }
    summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")

    for item in survivors:
        print(f"\n--- {item['status'].upper()}: {item['name']}\n{item['diff']}")
    for item in equivalent:
        print(f"\n(equivalent) {item['name']}: {item['reason']}")
    for name in stale:
        print(f"\n(stale EQUIVALENT entry, the mutant changed) {name}")
    print(
        f"\n[mutation] {module}: {total} mutants, {killed} killed, {counts.get('survived', 0)} survived "
        f"({len(equivalent)} equivalent), {counts.get('timeout', 0)} timeout, "
        f"{counts.get('no tests', 0)} no tests"
        + (f", {counts['not checked']} not checked (interrupted run)" if counts.get("not checked") else "")
        + f"; {runtime:.0f} s; summary: {summary_path.relative_to(ROOT)}"
    )
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
