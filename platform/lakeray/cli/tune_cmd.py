import click

from lakeray.cli.main import settings_from


@click.command()
@click.argument("spec_file", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, default=False,
              help="Continue the search of this spec (its folder under tune_runs/) after a crash: finished "
                   "trials are kept, unfinished ones continue from their checkpoints.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print one JSON summary (no live table).")
@click.option("--no-register", is_flag=True, default=False, help="Search and evaluate, but log nothing to MLflow.")
@click.pass_context
def tune(ctx: click.Context, spec_file: str, resume: bool, as_json: bool, no_register: bool) -> None:
    """Search hyperparameters of a train spec with Ray Tune (ASHA, Optuna); register the best as challenger.

    The tune spec (jobs/training/*_tune.yaml) and its base train spec are checked before any trial
    starts. Every trial trains with the same code as `lakeray train`.
    """
    import json

    from lakeray.cluster.ray_runtime import ray_session
    from lakeray.training.tune import check_search_folder, load_tune_spec, search, validate_search

    settings = settings_from(ctx)
    spec = load_tune_spec(spec_file)
    # every spec error, the bucket and the MLflow store, before any cluster time
    checked = validate_search(settings, spec, spec_file, register=not no_register)
    check_search_folder(settings, spec.name, resume)  # an existing search without --resume: before Ray starts
    view = None if as_json else _LiveTable(checked[0])
    with ray_session(settings):
        if view:
            view.start()
        try:
            report = search(settings, spec, spec_file, resume=resume, register=not no_register,
                            on_update=view.update if view else None, checked=checked)
        finally:
            if view:
                view.stop()
    summary = report.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    _print_summary(summary)


class _LiveTable:
    """One row per trial: its configuration, rounds done, current metric and state; the best in bold green."""

    def __init__(self, setup) -> None:
        from rich.console import Console
        from rich.live import Live

        self.setup = setup
        self.live = Live(self._render([]), console=Console(), refresh_per_second=4, transient=False)

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def update(self, trials) -> None:
        self.live.update(self._render(trials))

    def _render(self, trials):
        from rich.table import Table

        setup = self.setup
        unit = "rounds" if setup.base.model.kind == "xgboost" else "epochs"
        keys = list(setup.tune.space)
        done = sum(t.state in ("TERMINATED", "ERROR") for t in trials)
        table = Table(title=f"{setup.tune.name}: {done}/{setup.tune.num_samples} trials done "
                      f"({setup.tune.search.algorithm}, scheduler {setup.tune.scheduler.kind})")
        table.add_column("trial")
        for key in keys:
            table.add_column(key, justify="right")
        table.add_column(unit, justify="right")
        table.add_column(setup.metric_key, justify="right")
        table.add_column("state")
        scored = [t for t in trials if t.metric is not None]
        sign = 1 if setup.mode == "max" else -1
        best = max(scored, key=lambda t: sign * t.metric).trial_id if scored else None
        for t in trials:
            state = "stopped early" if t.stopped_early else t.state.lower()
            cells = [t.trial_id, *(_cell(t.config.get(k)) for k in keys), f"{t.rounds}/{t.max_rounds}",
                     f"{t.metric:.4f}" if t.metric is not None else "", state]
            table.add_row(*cells, style="bold green" if t.trial_id == best else None)
        return table


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_summary(s: dict) -> None:
    best = s["best"]
    where = f"{s['model']} (alias {s['alias']})" if s["model"] else "not registered (--no-register)"
    click.echo(f"{where}: best trial {best['trial_id']} {best['config']} — {s['metric']} "
               f"{s['held_out']:.4f} on the held-out rows of {s['input']}")
    stopped = sum(t["stopped_early"] for t in s["trials"])
    click.echo(f"  {len(s['trials'])} trials, {stopped} stopped early; {s['rounds_run']:,} of "
               f"{s['rounds_budget']:,} rounds run ({s['rounds_saved']:.0%} saved) in {s['seconds']:.1f} s")
    click.echo(f"  search folder {s['folder']} (continue a crashed search with `lakeray tune SPEC --resume`)")
