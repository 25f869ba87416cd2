"""Plugin discovery, enabling and the checks that run before any work.

Installed plugins are entry points in the ``plait.plugins`` group; recipes are entry
points in ``plait.recipes``. Listing either imports nothing. A plugin is imported only
when it is enabled (``--plugins``, ``--model`` or the owner of a ``--config`` recipe), and
``plait plugins`` imports only the light plugin modules to read what they provide.
"""
from __future__ import annotations

import difflib
import os
import types
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from typing import Any, Callable

import pluggy

from plait import hookspecs
from plait.errors import ConfigError, PluginError
from plait.hookspecs import PLUGIN_API_VERSION

PLUGIN_GROUP = "plait.plugins"
RECIPE_GROUP = "plait.recipes"
#: comma-separated names: only these installed plugins are visible (empty = none)
LOAD_PLUGINS_ENV = "PLAIT_LOAD_PLUGINS"



def distribution_of(plugin: str) -> str:
    """The distribution that ships plugin ``plugin`` by plait's naming convention
    (``tp`` -> ``plait-tp``, ``deepseek_v3`` -> ``plait-deepseek-v3``)."""
    return "plait-" + plugin.replace("_", "-")


@dataclass(frozen=True)
class InstalledPlugin:
    name: str
    distribution: str
    version: str
    entry_point: metadata.EntryPoint

    def import_module(self) -> types.ModuleType:
        try:
            module = self.entry_point.load()
        except Exception as exc:  # any import-time failure is the plugin's, report it
            raise PluginError(
                f"plugin {self.name!r} ({self.distribution} {self.version}) failed to import: "
                f"{type(exc).__name__}: {exc}. Fix its installation or drop it from --plugins."
            ) from exc
        if not isinstance(module, types.ModuleType):
            raise PluginError(
                f"plugin {self.name!r}: entry point {self.entry_point.value!r} must name a module"
            )
        return module


def _discover(group: str) -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=group):
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginError(
                f"two installed packages register {ep.name!r} in {group}: "
                f"{found[ep.name].value} and {ep.value}; uninstall one of them"
            )
        found[ep.name] = ep
    return found


def installed_plugins() -> dict[str, InstalledPlugin]:
    """Installed plugins by name, without importing any of them."""
    allowed = os.environ.get(LOAD_PLUGINS_ENV)
    allow = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    plugins = {}
    for name, ep in _discover(PLUGIN_GROUP).items():
        if allow is not None and name not in allow:
            continue
        dist = ep.dist
        plugins[name] = InstalledPlugin(
            name=name,
            distribution=dist.metadata["Name"] if dist else "?",
            version=dist.version if dist else "?",
            entry_point=ep,
        )
    return dict(sorted(plugins.items()))


def installed_recipes() -> dict[str, metadata.EntryPoint]:
    return dict(sorted(_discover(RECIPE_GROUP).items()))


def install_hint(name: str) -> str:
    return (f"pip install {distribution_of(name)} (from a plait checkout: pip install "
            f"./plugins/{name.replace('-', '_')} or ./models/{name})")


def _is_model_plugin(module: object) -> bool:
    """Enabled by --model or --config, not listed in --plugins."""
    return any(str(capability).startswith("model:") for capability in getattr(module, "PROVIDES", ()))


def _not_installed(name: str, installed: dict[str, InstalledPlugin]) -> PluginError:
    close = difflib.get_close_matches(name, list(installed), n=1)
    if close:
        return PluginError(
            f"unknown plugin {name!r}. Did you mean {close[0]!r}? Installed plugins: "
            f"{', '.join(installed)} (see `plait plugins`)."
        )
    return PluginError(
        f"plugin {name!r} is not installed: {install_hint(name)}. Installed plugins: "
        f"{', '.join(installed) or 'none'} (see `plait plugins`)."
    )


class PluginManager:
    """Wraps pluggy: enables plugins by name and collects what they register."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager("plait")
        self._pm.add_hookspecs(hookspecs)
        self._installed = installed_plugins()
        self._modules: dict[str, types.ModuleType] = {}
        from plait.builtin import CorePlugin

        self._pm.register(CorePlugin(self._pm.hook), name="plait.builtin")
        if os.environ.get("PLAIT_TRACE_HOOKS"):
            self._trace_hook_calls()

    @property
    def hook(self) -> Any:
        return self._pm.hook

    @property
    def installed(self) -> dict[str, InstalledPlugin]:
        return self._installed

    @property
    def enabled(self) -> list[str]:
        return list(self._modules)

    def module(self, name: str) -> types.ModuleType:
        return self._modules[name]

    def register_object(self, plugin: object, name: str) -> None:
        """Register an in-process plugin (tests, notebooks); same checks as installed ones."""
        self._check_api_version(name, plugin)
        self._pm.register(plugin, name=name)
        self._modules[name] = plugin  # type: ignore[assignment]
        self._pm.check_pending()

    def enable(self, names: list[str]) -> None:
        """Import, check and register plugins; their ``REQUIRES`` must be enabled too."""
        for name in names:
            if name in self._modules:
                continue
            if name not in self._installed:
                raise _not_installed(name, self._installed)
            module = self._installed[name].import_module()
            self._check_api_version(name, module)
            self._pm.register(module, name=name)
            self._modules[name] = module
        for name in names:
            for required in getattr(self._modules[name], "REQUIRES", ()):
                if required not in self._modules:
                    where = "" if required in self._installed else f" (not installed: {install_hint(required)})"
                    selected = [n for n, m in self._modules.items() if not _is_model_plugin(m)]  # --plugins
                    raise PluginError(
                        f"plugin {name!r} requires plugin {required!r}: add it, e.g. "
                        f"--plugins {','.join([*selected, required])}{where}"
                    )
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"a plugin implements an unknown hook: {exc}") from exc
        self.__dict__.pop("model_specs", None)
        self.__dict__.pop("config_sections", None)

    def _check_api_version(self, name: str, module: object) -> None:
        version = getattr(module, "PLAIT_API_VERSION", None)
        if version is None:
            raise PluginError(
                f"plugin {name!r} does not declare PLAIT_API_VERSION; it is not a plait plugin "
                f"(or predates API {PLUGIN_API_VERSION})"
            )
        if int(version) != PLUGIN_API_VERSION:
            raise PluginError(
                f"plugin {name!r} was built for plait plugin API {version}, but this plait "
                f"({_plait_version()}) provides API {PLUGIN_API_VERSION}: install a version of "
                f"the plugin built for API {PLUGIN_API_VERSION}"
            )

    def provides(self, capability: str) -> bool:
        return any(capability in getattr(m, "PROVIDES", ()) for m in self._modules.values())

    def _light_modules(self):
        """(name, module) of every importable installed plugin; only used to word errors
        and listings, since it imports the light plugin modules."""
        for name, plugin in self._installed.items():
            try:
                yield name, self._modules.get(name) or plugin.import_module()
            except PluginError:
                continue

    def providers_of(self, capability: str) -> list[str]:
        """Installed (not necessarily enabled) plugins that provide ``capability``."""
        return [name for name, module in self._light_modules() if capability in getattr(module, "PROVIDES", ())]

    def installed_models(self) -> list[str]:
        """Model names that installed plugins provide."""
        return sorted(
            capability[len("model:"):]
            for _, module in self._light_modules()
            for capability in getattr(module, "PROVIDES", ())
            if capability.startswith("model:")
        )

    @cached_property
    def model_specs(self) -> dict[str, Any]:
        specs: dict[str, Any] = {}
        owners: dict[str, str] = {}

        def collect(plugin_name: str) -> Callable[[Any], None]:
            def register(spec: Any) -> None:
                if spec.name in specs:
                    raise PluginError(
                        f"model {spec.name!r} is registered twice: by {owners[spec.name]!r} and "
                        f"by {plugin_name!r}; disable one of them"
                    )
                spec.provided_by = plugin_name
                specs[spec.name] = spec
                owners[spec.name] = plugin_name

            return register

        for name in self._modules:
            self._hook_of(name, "plait_register_models")(register=collect(name))
        return specs

    def results_by_plugin(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """(plugin name, result) of each implementation of the collect-all hook ``hook_name``
        that returns something, for checks whose messages must name the plugin."""
        implementations = getattr(self._pm.hook, hook_name).get_hookimpls()
        results = []
        for name in dict.fromkeys(impl.plugin_name for impl in implementations):
            results += [(name, result) for result in self._hook_of(name, hook_name)(**kwargs)]
        return results

    def _hook_of(self, plugin_name: str, hook_name: str) -> Any:
        """``hook_name`` restricted to one plugin's implementation, called through pluggy
        (so tracing sees it), for registration hooks that must know who registered what."""
        others = [plugin for name, plugin in self._pm.list_name_plugin() if name != plugin_name]
        return self._pm.subset_hook_caller(hook_name, remove_plugins=others)

    @cached_property
    def config_sections(self) -> dict[str, type]:
        sections: dict[str, type] = {}
        owners: dict[str, str] = {}
        from plait.config import JobConfig

        reserved = set(JobConfig.__dataclass_fields__)
        for name in self._modules:

            def register(section: str, cls: type, _owner: str = name) -> None:
                if section in reserved:
                    raise PluginError(f"plugin {_owner!r} registers config section {section!r}, "
                                      "which is a core section; rename it")
                if section in sections:
                    raise PluginError(f"config section {section!r} is registered by both "
                                      f"{owners[section]!r} and {_owner!r}")
                sections[section] = cls
                owners[section] = _owner

            self._hook_of(name, "plait_add_config_sections")(register=register)
        return sections

    def model_spec(self, name: str) -> Any:
        specs = self.model_specs
        if name not in specs:
            raise ConfigError(
                f"no enabled plugin provides model {name!r}; enabled models: "
                f"{', '.join(specs) or 'none'}. Pass --model {name} with its package installed."
            )
        return specs[name]

    def enable_model(self, name: str) -> None:
        """Enable the plugin that provides model ``name`` (by default, the plugin of that name)."""
        if name in self._installed:
            self.enable([name])
            return
        providers = self.providers_of(f"model:{name}")
        if providers:
            self.enable(providers[:1])
            return
        raise _not_installed(name, self._installed)

    def _trace_hook_calls(self) -> None:
        import sys

        def before(hook_name: str, impls: list, kwargs: dict) -> None:
            print(f"[plait hook] {hook_name} -> {[i.plugin_name for i in impls]}", file=sys.stderr)

        def after(outcome: Any, hook_name: str, impls: list, kwargs: dict) -> None:
            pass

        self._pm.add_hookcall_monitoring(before, after)


def recipe_owner(recipe: str) -> tuple[str, Callable[[], Any]]:
    """(plugin name, recipe function) for a ``--config`` recipe name, importing only its owner."""
    recipes = installed_recipes()
    if recipe not in recipes:
        close = difflib.get_close_matches(recipe, list(recipes), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown recipe {recipe!r}.{hint} Installed recipes: {', '.join(recipes) or 'none'}"
        )
    ep = recipes[recipe]
    plugins = [p for p in installed_plugins().values() if ep.dist and p.distribution == ep.dist.metadata["Name"]]
    if not plugins:
        raise PluginError(
            f"recipe {recipe!r} comes from {ep.dist.metadata['Name'] if ep.dist else ep.value}, "
            "which registers no plugin in the plait.plugins group"
        )
    try:
        fn = ep.load()
    except Exception as exc:
        raise PluginError(f"recipe {recipe!r} failed to import: {type(exc).__name__}: {exc}") from exc
    return plugins[0].name, fn


def load_model_spec(name: str) -> Any:
    """The ModelSpec of model ``name``, enabling only its plugin (used by from_pretrained)."""
    manager = PluginManager()
    manager.enable_model(name)
    return manager.model_spec(name)


def _plait_version() -> str:
    try:
        return metadata.version("plait")
    except metadata.PackageNotFoundError:
        return "unknown"

