"""What one `kvchunks` invocation (or one chat) works on: options, consoles, the open manager.

The manager is opened on first use, so `--help`, usage errors and bad files never pay for
loading the model. Commands that read and change only the registry (list, info, tag, activate,
...) work on the catalog, which never imports torch. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from kvchunks.common import data_dir

if TYPE_CHECKING:
    from kvchunks import Catalog, ContextManager

MODEL_ENV = "KVCHUNKS_MODEL"


@dataclass
class State:
    model: str | None = None
    home: Path | None = None
    context: str = "default"
    mode: str | None = None  # composition mode for this invocation's generations; None: setting
    recompute: float | None = None  # realign's fraction for them; None: the setting's
    address: str | None = None
    dtype: str | None = None  # of the model this process loads; None: EngineConfig's
    step_tokens: int | None = None  # its max_num_batched_tokens; None: EngineConfig's
    sampling: dict = field(default_factory=dict)  # the chat's: the options given, then /set
    out: Console = field(default_factory=Console)
    err: Console = field(default_factory=lambda: Console(stderr=True))
    _manager: ContextManager | None = None
    _catalog: Catalog | None = None

    @property
    def data_dir(self) -> Path:
        return self.home if self.home is not None else data_dir()

    @property
    def manager(self) -> ContextManager:
        if self._manager is None:
            self._manager = self._connect() if self.address else self._open()
        return self._manager

    def _open(self) -> ContextManager:
        from kvchunks import ContextManager, EngineConfig
        from kvchunks.cli.model import resolve

        model = resolve(self.model)  # prepares the default model (with its own progress)
        self.model = str(model)
        options = self.engine_options()
        engine = EngineConfig(**options) if options else None
        with self.err.status(f"loading {model.name}", spinner="dots"):
            return ContextManager(model, context=self.context, home=self.home, engine_config=engine)

    def engine_options(self) -> dict:
        """The EngineConfig fields given for the model this process (or a service) loads."""
        given = {"dtype": self.dtype, "max_num_batched_tokens": self.step_tokens}
        return {name: value for name, value in given.items() if value is not None}

    @property
    def catalog(self) -> Catalog:
        """What the registry-only commands work on: the manager if one is open or the work is
        on a cluster (it knows the pool: tiers as they are), else the registry alone, whose
        tiers are the recorded ones, opened without the model's engine."""
        if self._manager is not None or self.address:
            return self.manager
        if self._catalog is None:
            self._catalog = self._open_catalog()
        return self._catalog

    def _open_catalog(self) -> Catalog:
        from kvchunks import open_catalog

        # The model is looked for only when a command needs its context window.
        return open_catalog(self.model, context=self.context, home=self.home, dtype=self.dtype)

    def check_mode(self) -> None:
        """Refuse this run's --recompute if it does not go with --mode, or with the context's
        mode when none is given, before anything is loaded (as a generation would)."""
        from kvchunks.vocabulary import check_recompute

        if self.recompute is not None:
            check_recompute(self.mode or self.catalog.settings["mode"], self.recompute)

    def _connect(self) -> ContextManager:
        from kvchunks.actors.client import connect  # imports ray: only with --address

        return connect(self.address, self.context)  # type: ignore[return-value]

    def close(self) -> None:
        for opened in (self._manager, self._catalog):
            if opened is not None:
                opened.close()
        self._manager = self._catalog = None


pass_state = click.make_pass_decorator(State)
