"""``moestream features load``: static user and item attributes into the feature store the pipeline shares.

The trainer and the serving replicas read them beside the streaming aggregates: the numeric ones as dense
features, the categorical ones (``features.definitions.CATEGORICAL_COLUMNS``) as codes that a table of
``learner.tables`` embeds. Loading again replaces what an entity had (``OnlineFeatures.load_static``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from infra.console import CommandConsole

app = typer.Typer(help="The feature store: static attributes.", no_args_is_help=True)
console = CommandConsole()

StaticFile = Annotated[Optional[Path], typer.Option(
    exists=True, dir_okay=False, readable=True,
    help="CSV or Parquet, KuaiRand-1K's format (user_features_1k.csv, video_features_basic_1k.csv) or the "
         "simulator's (user_id, activity / item_id, quality).",
)]


@app.command("load")
def load_static(
    users: StaticFile = None,
    items: StaticFile = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", dir_okay=False,
                                                   help="moestream.yaml (default: $MOESTREAM_CONFIG).")] = None,
) -> None:
    """Load static user and/or item attribute files into the feature store (features.*)."""
    if users is None and items is None:
        raise typer.BadParameter("give --users, --items or both")
    from infra.cli import load  # the one configuration loader and its messages

    cfg = load(config)
    from features.static import StaticSchemaError
    from features.store import OnlineFeatures

    store = OnlineFeatures(cfg.features)
    try:
        with console.status("loading static attributes"):
            loaded = store.load_static(users=users, items=items)
    except (StaticSchemaError, OSError, ValueError) as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from None
    finally:
        store.flush()
    for kind, rows in loaded.items():
        console.print(f"loaded {rows} {kind} rows into the feature store at {cfg.features.data_dir}",
                      markup=False, highlight=False)
