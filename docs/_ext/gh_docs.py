"""Sphinx directives that generate documentation from the code of optax_gradhealth.

* ``gh-api``: the API reference, one autodoc entry per name of
  ``optax_gradhealth.__all__`` (grouped by the module that defines it), so a name
  exported later is documented without editing the docs.
* ``gh-metrics-catalogue``: the metrics catalogue, one table row per name of
  ``optax_gradhealth.CATALOGUE`` (meaning and healthy range from the package's table
  of metric specs, ``optax_gradhealth._catalogue.SPECS``). Every submodule is imported
  first, so names registered with ``gh.register_metrics`` are included. A name without
  a healthy range is a build warning, hence an error under ``-W``: declare it in SPECS.
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

from optax_gradhealth import _catalogue

logger = logging.getLogger(__name__)

PACKAGE = "optax_gradhealth"
# Submodules that are entry points (running them has effects); they register nothing.
_NOT_IMPORTED = {"__main__", "demo"}

# What a healthy run shows for each metric, and what a departure suggests: the `healthy`
# column of the package's one table of metric specs (optax_gradhealth._catalogue.SPECS).
# A name registered elsewhere (gh.register_metrics, by a user) without an entry here is a
# build warning.
HEALTHY_RANGES: dict[str, str] = {name: spec.healthy for name, spec in _catalogue.SPECS.items()}

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
    ":func:`metrics` can return (``grad/leaf_norm/<path>`` stands for one entry per gradient leaf). "
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
                "gh_docs: metric %r is in CATALOGUE but has no healthy range "
                "(declare it in optax_gradhealth/_catalogue.py)",
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
