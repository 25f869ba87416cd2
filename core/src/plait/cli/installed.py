"""What installed plugins declare (PROVIDES, REQUIRES, DESCRIPTION), read from their
sources without importing them where possible, for listings and help."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
import textwrap
from typing import Any

from plait.errors import PlaitError


@dataclasses.dataclass(frozen=True)
class PluginInfo:
    """What a plugin module declares, read without running it where possible."""

    provides: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    description: str = ""
    error: str = ""


_DECLARED = {"PROVIDES": "provides", "REQUIRES": "requires", "DESCRIPTION": "description"}


def _declared_in_source(module_name: str) -> PluginInfo | None:
    """PROVIDES/REQUIRES/DESCRIPTION as literals in the module's source, or None (then the
    module is imported). Locating the module imports its parent package only."""
    try:
        spec = importlib.util.find_spec(module_name)
        origin = spec.origin if spec else None
        if not origin or not origin.endswith(".py"):
            return None
        with open(origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=origin)
    except Exception:  # a broken plugin: the import fallback words the error
        return None
    values: dict[str, Any] = {}
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        for target in targets:
            if isinstance(target, ast.Name) and target.id in _DECLARED and node.value is not None:
                try:
                    values[_DECLARED[target.id]] = ast.literal_eval(node.value)
                except ValueError:
                    return None
    return _info(values)


def _info(values: dict[str, Any]) -> PluginInfo:
    return PluginInfo(provides=tuple(str(v) for v in values.get("provides") or ()),
                      requires=tuple(str(v) for v in values.get("requires") or ()),
                      description=str(values.get("description") or ""))


def plugin_info(plugin: Any) -> PluginInfo:
    """PROVIDES, REQUIRES and DESCRIPTION of an installed plugin (``InstalledPlugin``)."""
    module_name = plugin.entry_point.module
    module = sys.modules.get(module_name)
    if module is None:
        info = _declared_in_source(module_name)
        if info is not None:
            return info
        try:
            module = plugin.import_module()
        except PlaitError as exc:
            return PluginInfo(error=str(exc))
    return _info({field: getattr(module, name, None) for name, field in _DECLARED.items()})


def installed_summary() -> tuple[dict[str, PluginInfo], list[str], list[str]]:
    """(info by installed plugin, model names, recipe names), importing no plugin."""
    from plait.plugins import installed_plugins, installed_recipes

    plugins = installed_plugins()
    infos = {name: plugin_info(plugin) for name, plugin in plugins.items()}
    models = sorted(c[len("model:"):] for info in infos.values() for c in info.provides if c.startswith("model:"))
    distributions = {plugin.distribution for plugin in plugins.values()}
    recipes = [name for name, ep in installed_recipes().items()  # those of a visible plugin package
               if ep.dist is None or ep.dist.metadata["Name"] in distributions]
    return infos, models, recipes


def section_owners() -> dict[str, str]:
    """Config section -> the installed plugin that adds it. Imports the light plugin
    modules, so it runs only to word an error."""
    from plait.plugins import installed_plugins

    owners: dict[str, str] = {}
    for name, plugin in installed_plugins().items():
        try:
            hook = getattr(plugin.import_module(), "plait_add_config_sections", None)
            if hook is not None:
                hook(register=lambda section, cls, _name=name: owners.setdefault(section, _name))
        except Exception:  # noqa: BLE001 - a broken plugin owns nothing here
            continue
    return owners


def installed_lines() -> list[str]:
    infos, models, recipes = installed_summary()
    plugins = [name for name, info in infos.items() if not any(c.startswith("model:") for c in info.provides)]
    lines = []
    for title, names in (("recipes (--config)", recipes), ("models (--model)", models),
                         ("plugins (--plugins)", plugins)):
        lines += textwrap.wrap(", ".join(names) or "none", width=100, initial_indent=f"  {title + ':':<21} ",
                               subsequent_indent=" " * 24)
    return lines
