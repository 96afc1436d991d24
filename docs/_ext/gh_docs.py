"""Sphinx directives that generate documentation from the code of optax_gradhealth.

* ``gh-api``: the API reference, one autodoc entry per name of
  ``optax_gradhealth.__all__`` (grouped by the module that defines it), so a name
  exported later is documented without editing the docs.
* ``gh-metrics-catalogue``: the metrics catalogue, one table row per name of
  ``optax_gradhealth.CATALOGUE`` (meaning from the code, healthy range from
  ``HEALTHY_RANGES`` below). Every submodule is imported first, so the names that
  other modules register with ``gh.register_metrics`` are included. A name without a
  healthy range is a build warning, hence an error under ``-W``: add its range here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

PACKAGE = "optax_gradhealth"
# Submodules that are entry points (running them has effects); they register nothing.
_NOT_IMPORTED = {"__main__", "demo"}

# What a healthy run shows for each metric, and what a departure suggests. Keep one entry
# per name of CATALOGUE (the build warns about a missing one).
HEALTHY_RANGES: dict[str, str] = {
    # clip modes, accumulation and loss scaling (optax_gradhealth._clip_modes, _accumulation, _loss_scale)
    "grad/micro_batch_norms": "similar values across the micro-batches of one update; one far above the others "
    "points at a bad micro-batch.",
    "grad/value_clip_count": "0 or a small number of elements; a large count means the value bound is too tight.",
    "grad/value_clip_fraction": "below ~0.01; near 1 the bound is too tight and clipping changes the direction.",
    "grad/layer_clip_fraction": "0 on most steps; near 1 on every step means the per-layer bound is too low.",
    "grad/layer_clipped/<path>": "False on most steps; one layer clipped on every step deserves a look (its norm "
    "in grad/layer_norm/<path>).",
    "grad/agc_clip_count": "a small share of the units; many units clipped every step means lambda is too small.",
    "grad/agc_clip_fraction": "below ~0.1 once training settles; near 1 means lambda (default 0.01) is too small.",
    "grad/num_overflows": "rises by a few per 2000 steps as the scale probes upward (expected); growing every "
    "step means the scale cannot find a level: check the loss for Inf.",
    # guard and clip, every step
    "grad/norm": "finite and > 0; varies smoothly, usually within 2x of grad/norm_mean. NaN/Inf only on a "
    "skipped step; a slow climb over thousands of steps often precedes divergence.",
    "grad/norm_clipped": "equal to grad/norm on most steps, below it on clipped steps, 0 only on skipped steps.",
    "grad/clip_threshold": "a little above the typical grad/norm, so that only the top few percent of steps are "
    "clipped; inf when clipping is off.",
    "grad/clipped": "True on a few percent of steps. True on (almost) every step: the threshold is too low (the "
    "optimizer sees a fixed-size step); never True over a long run: the threshold does nothing.",
    "grad/finite": "True. A rare False is tolerated (the step is skipped); frequent False is a numerics bug.",
    "grad/skipped": "False on (almost) every step.",
    "grad/spike": "rarely True (well under 1% of steps).",
    "grad/spike_score": "around 1 (about 0.5 to 2). Above spike_threshold (5 by default) with a robust z-score "
    "above spike_zscore (6): a spike. 0 during warm-up.",
    "grad/zscore": "within about +-3. 0 during warm-up.",
    "grad/norm_mean": "positive, changing slowly.",
    "grad/norm_std": "below grad/norm_mean (coefficient of variation std / mean well under 1).",
    "grad/loss_zscore": "within about +-3 (0 when no loss= is passed).",
    "grad/momentum_reset": "False. An occasional reset is survivable; repeated resets mean persistent spikes "
    "(learning rate too high, bad data).",
    "grad/rollback": "False. Once True it stays True: restore the last healthy checkpoint.",
    "grad/vanishing": "False after the first steps. True for many steps while the loss is high: vanishing "
    "gradients (dead units, saturated activations, a learning rate decayed to nothing).",
    "grad/first_nonfinite_leaf": "-1 (no non-finite step yet); otherwise the leaf to inspect, named by "
    "gh.leaf_names(params)[index].",
    "grad/num_steps": "equal to the number of update calls (skipped steps included).",
    "grad/num_clipped": "a small fraction (a few percent) of grad/num_steps.",
    "grad/num_nonfinite": "0, or growing only rarely. Steady growth: fp16 without loss scaling, log(0), a "
    "division by zero, bad data.",
    "grad/num_nonfinite_updates": "0. Growing: the optimizer itself makes the NaN/Inf from finite gradients "
    "(an infinite learning rate, fp16/bf16 moments overflowing, bf16 hyperparameters rounding b2 to 1).",
    "grad/num_skipped": "about grad/num_nonfinite (plus grad/num_spikes with spike_action='skip'); a small "
    "fraction of steps.",
    "grad/num_spikes": "well under 1% of grad/num_steps.",
    "grad/num_momentum_resets": "0, or a handful over a whole run.",
    "grad/consecutive_nonfinite": "0 (1 on an isolated bad step). Reaching rollback_after_nonfinite (10) "
    "raises grad/rollback.",
    "grad/consecutive_spikes": "0 (1 on an isolated spike). Reaching rollback_after_spikes (10) raises grad/rollback.",
    "grad/layer_norm/<path>": "finite; the ratios between layers steady over time. One layer far above the "
    "others (or climbing) is where a blow-up starts; a layer at ~0 is dead or frozen.",
    # mixed precision / loss scaling
    "grad/overflow": "False on almost every step. A few overflows right after each growth of the scale are "
    "normal: that is how the scale finds its ceiling.",
    "grad/loss_scale": "a power of two that settles (moving by 2x around its ceiling). A collapse toward the "
    "lower bound: gradients overflow even at a small scale.",
    # cross-device audit
    "xdev/device_norms": "all devices within about 10-20% of one another (same data distribution).",
    "xdev/norm_cv": "small (under about 0.2 for per-device batches of reasonable size).",
    "xdev/norm_max_over_min": "close to 1 (under about 1.5).",
    "xdev/agreement": "between 0 and 1, steady; higher for larger per-device batches. Persistently ~0: "
    "noise-dominated (batch too small, learning rate too high). A sudden drop from > 0.5 to ~0: seed desync "
    "or sampler misalignment. Above 0.99: duplicated data shards.",
    "xdev/audited": "True on audit steps (every step at first, then every N steps).",
    "xdev/cosine_to_mean": "positive and similar for every device; one device far below the others is an outlier.",
    "xdev/pairwise_cosine": "off-diagonal entries positive and similar; an entry near 1 flags two devices "
    "seeing the same data.",
    "xdev/mean_pairwise_cosine": "positive and below 0.99.",
    "xdev/outlier_device": "-1 (no outlier). The same device flagged again and again: a hardware fault or "
    "silent data corruption on it.",
    "xdev/outlier_score": "below the outlier threshold (10), usually below 3.",
    "xdev/outlier_devices": "all False. A device True at one audit only: a transient fault (a bit flip, a bad "
    "batch); True audit after audit: hardware or that device's data.",
    "xdev/norm_score": "below about 3 for every device; one device high: its gradient norm differs from the others'.",
    "xdev/direction_score": "below about 3 for every device; one device high: its gradient points elsewhere "
    "(label noise, a broken augmentation, stale parameters).",
    "xdev/outlier_evidence": "0 or a few units; climbing toward outlier_evidence (12): a persistent moderate "
    "deviation on that device.",
    "xdev/near_duplicate_pairs": "all False. A pair True: two devices see the same examples.",
    "xdev/duplicate_pairs": "0.",
    "xdev/param_desync": "0 / False: the replicas' parameters are identical.",
    "xdev/noise_scale": "positive, usually growing during training. A global batch far above it gives "
    "diminishing returns; far below it wastes steps.",
    "xdev/grad_sq_est": "positive on average (a single step's estimate is noisy and can be negative).",
    "xdev/trace_cov_est": "positive on average (noisy per step).",
}

# Order of the API reference's sections (by defining module); others follow alphabetically.
_MODULE_ORDER = ["_stats", "_clipping", "_guard", "_metrics"]

# Group titles of the catalogue, by the first component of the name.
_GROUP_TITLES = {
    "grad": "Gradient health (guard and clipping)",
    "xdev": "Cross-device audit",
}


def import_submodules() -> list[str]:
    """Imports every submodule of the package (so every register_metrics call has run).

    Entry points (``__main__``, ``demo``) are not imported. A host-side module whose
    optional third-party dependency is not installed (a writer needing ``wandb``, say)
    is skipped with an info message; any other import error is a build warning.
    """
    names = []
    pending = [importlib.import_module(PACKAGE)]
    while pending:
        package = pending.pop()
        for info in pkgutil.iter_modules(package.__path__, prefix=package.__name__ + "."):
            if info.name.rsplit(".", 1)[-1] in _NOT_IMPORTED:
                continue
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as error:
                if error.name and not error.name.startswith(PACKAGE):
                    logger.info("gh_docs: skipped %s (optional dependency %s missing)", info.name, error.name)
                    continue
                logger.warning("gh_docs: importing %s failed: %r", info.name, error, type="gh", subtype="import")
                continue
            except Exception as error:  # surfaced as a build warning (an error under -W)
                logger.warning("gh_docs: importing %s failed: %r", info.name, error, type="gh", subtype="import")
                continue
            names.append(info.name)
            if info.ispkg:
                pending.append(module)
    return sorted(names)


def _defining_module(name: str, obj: Any, modules: list[str]) -> str:
    module = getattr(obj, "__module__", None)
    if isinstance(module, str) and module.startswith(PACKAGE):
        return module
    for module_name in modules:  # data (e.g. a dict) has no __module__: find its home
        module_obj = importlib.import_module(module_name)
        if name in getattr(module_obj, "__all__", ()) and getattr(module_obj, name, None) is obj:
            return module_name
    return PACKAGE


def _public_methods(cls: type) -> list[str]:
    """Public methods a class defines itself (dataclass fields and NamedTuple fields excluded)."""
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        return []  # NamedTuple states: the fields are documented by the Attributes section
    names = []
    for attr, value in vars(cls).items():
        if attr.startswith("_"):
            continue
        if inspect.isfunction(value) or isinstance(value, (classmethod, staticmethod, property)):
            names.append(attr)
    return names


# Data exported without a ``#:`` doc comment (autodoc would show the docstring of its
# type, e.g. dict's).
DATA_DOCS = {
    "CATALOGUE": "The catalogue of metric names: ``{name: one-line meaning}``. Every key is a name that "
    ":func:`metrics` can return (``grad/layer_norm/<path>`` stands for one entry per gradient leaf). "
    "Modules add their names with :func:`register_metrics`. The :doc:`metrics page </metrics>` is "
    "generated from it.",
}


def _has_doc_comment(module_name: str, name: str) -> bool:
    from sphinx.pycode import ModuleAnalyzer

    try:
        docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
    except Exception:
        return False
    return ("", name) in docs


def _data_entry(name: str, obj: Any, target: str) -> list[str]:
    doc = DATA_DOCS.get(name)
    if doc is None:
        logger.warning(
            "gh_docs: %s has no documentation: add a `#:` comment above its definition",
            target,
            type="gh",
            subtype="api",
        )
        doc = "(undocumented)"
    module, _, short = target.rpartition(".")
    return [f".. py:data:: {short}", f"   :module: {module}", f"   :type: {type(obj).__name__}", "", f"   {doc}"]


def _first_line(module_name: str) -> str:
    doc = inspect.getdoc(importlib.import_module(module_name)) or module_name
    return doc.strip().split("\n\n")[0].replace("\n", " ")


class ApiDirective(SphinxDirective):
    """``gh-api``: autodoc entries for every name of ``optax_gradhealth.__all__``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        if type(self.state).__module__.startswith("myst_parser"):
            # Its output is reStructuredText (autodoc directives): in a Markdown page,
            # write it inside an eval-rst fence.
            logger.warning(
                "gh_docs: use gh-api inside an eval-rst block in Markdown pages",
                location=(self.env.docname, self.lineno),
                type="gh",
                subtype="api",
            )
        modules = import_submodules()
        package = importlib.import_module(PACKAGE)
        groups: dict[str, list[str]] = {}
        for name in package.__all__:
            obj = getattr(package, name)
            groups.setdefault(_defining_module(name, obj, modules), []).append(name)

        lines = [f".. currentmodule:: {PACKAGE}", ""]

        def order(module_name: str) -> tuple[bool, int, str]:
            short = module_name.rsplit(".", 1)[-1]
            first = _MODULE_ORDER.index(short) if short in _MODULE_ORDER else len(_MODULE_ORDER)
            return (module_name == PACKAGE, first, module_name)

        for module_name in sorted(groups, key=order):
            lines += [f".. rubric:: {_first_line(module_name)}", ""]
            for name in groups[module_name]:
                obj = getattr(package, name)
                target = f"{PACKAGE}.{name}"
                if inspect.isclass(obj):
                    lines.append(f".. autoclass:: {target}")
                    methods = _public_methods(obj)
                    if methods:
                        lines.append(f"   :members: {', '.join(methods)}")
                        lines.append("   :undoc-members:")
                elif callable(obj):
                    lines.append(f".. autofunction:: {target}")
                elif isinstance(obj, types.ModuleType):
                    lines.append(f".. automodule:: {target}")
                elif _has_doc_comment(module_name, name):
                    lines.append(f".. autodata:: {target}")
                    lines.append("   :no-value:")
                else:
                    lines += _data_entry(name, obj, target)
                lines.append("")
        return self.parse_text_to_nodes("\n".join(lines))


def _group_of(name: str) -> str:
    return name.split("/", 1)[0]


class MetricsCatalogueDirective(SphinxDirective):
    """``gh-metrics-catalogue``: one table per metric group, every name of CATALOGUE."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        import_submodules()
        catalogue = importlib.import_module(PACKAGE).CATALOGUE
        missing = [name for name in catalogue if name not in HEALTHY_RANGES]
        for name in missing:
            logger.warning(
                "gh_docs: metric %r is in CATALOGUE but has no healthy range in docs/_ext/gh_docs.py (HEALTHY_RANGES)",
                name,
                location=(self.env.docname, self.lineno),
                type="gh",
                subtype="healthy_range",
            )

        groups: dict[str, list[str]] = {}
        for name in catalogue:
            groups.setdefault(_group_of(name), []).append(name)
        result: list[nodes.Node] = []
        order = [*(_GROUP_TITLES), *sorted(set(groups) - set(_GROUP_TITLES))]
        for group in order:
            if group not in groups:
                continue
            result.append(nodes.rubric(text=_GROUP_TITLES.get(group, f"{group}/...")))
            result.append(self._table(groups[group], catalogue))
        return result

    def _table(self, names: list[str], catalogue: dict[str, str]) -> nodes.table:
        table = nodes.table(classes=["gh-metrics"])
        group = nodes.tgroup(cols=3)
        table += group
        for width in (22, 39, 39):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += self._row([nodes.Text("Name"), nodes.Text("Meaning"), nodes.Text("Healthy range")])
        body = nodes.tbody()
        group += body
        for name in names:
            literal = nodes.literal(text=name)
            row = self._row(
                [literal, nodes.Text(catalogue[name]), nodes.Text(HEALTHY_RANGES.get(name, "(not documented)"))]
            )
            row["ids"].append(nodes.make_id("metric-" + name))
            body += row
        return table

    @staticmethod
    def _row(cells: list[nodes.Node]) -> nodes.row:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += nodes.paragraph("", "", cell)
            row += entry
        return row


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("gh-api", ApiDirective)
    app.add_directive("gh-metrics-catalogue", MetricsCatalogueDirective)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
