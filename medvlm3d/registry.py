"""A small name -> builder registry, in the manner of timm's `create_model`.

Each component module owns one `Registry` (e.g. `ENCODERS3D`) and registers its builders:

    @ENCODERS3D.register("vit")
    def _vit(cfg: Encoder3DConfig) -> nn.Module: ...

    ENCODERS3D.build("vit", cfg)

An unknown name raises `ConfigError` (a `ValueError`) listing the registered names. Dispatch is by exact name
only, never by substrings.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from medvlm3d.data.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """Maps exact names to builder callables."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def wrap(fn: F) -> F:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
            return fn

        return wrap

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {sorted(self._builders)}")
        return self._builders[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders
