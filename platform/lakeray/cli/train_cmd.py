import click

from lakeray.cli.main import settings_from


@click.command()
@click.argument("spec_file", required=False, type=click.Path(dir_okay=False))
@click.option("--resume", "resume_run", default=None, metavar="RUN",
              help="Continue run RUN (printed by an earlier `lakeray train`) from its last checkpoint.")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print one JSON summary (no live view).")
@click.option("--no-register", is_flag=True, default=False, help="Train and evaluate, but log nothing to MLflow.")
@click.pass_context
def train(ctx: click.Context, spec_file: str | None, resume_run: str | None, as_json: bool, no_register: bool) -> None:
    """Train the model a TrainSpec describes (jobs/training/*.yaml) on Ray; register it with its alias.

    The spec is checked against the pinned training-set version (columns, types, split, classes)
    before Ray starts; a driver that died mid-run is continued with --resume RUN.
    """
    import json

    from lakeray.cluster.ray_runtime import ray_session
    from lakeray.errors import ConfigError
    from lakeray.training import api
    from lakeray.training.spec import load_train_spec

    if (spec_file is None) == (resume_run is None):
        raise ConfigError("give a train spec file, or --resume RUN (not both)",
                          "e.g. `lakeray train jobs/training/fraud_xgboost.yaml`")
    settings = settings_from(ctx)
    if resume_run:
        spec, where = api.load_run_spec(settings, resume_run)
    else:
        spec, where = load_train_spec(spec_file), spec_file
    plan = api.validate(settings, spec, where)  # every spec error, before any cluster time
    view = None if as_json else _LiveView(plan)
    with ray_session(settings):
        if view:
            view.start()
        try:
            if resume_run:
                report = api.resume(settings, resume_run, register=not no_register,
                                    on_event=view.event if view else None, plan=plan)
            else:
                report = api.train(settings, spec, where, register=not no_register,
                                   on_event=view.event if view else None, plan=plan)
        finally:
            if view:
                view.stop()
    summary = report.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print_summary(summary, plan.spec.metric.name)


class _LiveView:
    """A progress bar of rounds/epochs with the latest validation metric, fed by the run's progress events."""

    def __init__(self, plan) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.metric = f"valid_{plan.spec.metric.name}"
        unit = "rounds" if plan.spec.model.kind == "xgboost" else "epochs"
        self.progress = Progress(TextColumn("[bold]{task.fields[status]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(unit), TextColumn("{task.fields[metric]}"), TimeElapsedColumn(),
                                 transient=False)
        self.task = self.progress.add_task("train", total=plan.spec.model.rounds, status="starting workers",
                                           metric="")

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def event(self, event: dict) -> None:
        kind = event.get("event")
        fields = {}
        if kind == "started":
            fields["status"] = "training" if not event.get("attempt") else f"restarted ({event['attempt']})"
        elif kind == "resumed":
            fields["status"] = f"resumed at {event['step']}"
        if self.metric in event:
            fields["metric"] = f"{self.metric} {event[self.metric]:.4f}"
        if kind in ("step", "resumed", "checkpoint"):
            self.progress.update(self.task, completed=int(event["step"]), **fields)
        elif fields:
            self.progress.update(self.task, **fields)


def _print_summary(s: dict, metric: str) -> None:
    where = f"{s['model']} (alias {s['alias']})" if s["model"] else "not registered (--no-register)"
    value = s["metrics"][metric]
    click.echo(f"{where} from {s['input']}: {metric} {value:.4f} on {s['valid_rows']:,} held-out rows")
    best = f", best at {s['best_step']}" if s["best_step"] else ""
    click.echo(f"  {s['kind']} on {s['workers']} worker(s) ({s['path']}{', GPU' if s['use_gpu'] else ''}): "
               f"{s['steps']} steps{best}; training {s['train_s']:.1f} s + start-up {s['startup_s']:.1f} s "
               f"(of which Delta read {s['load_s']:.1f} s)")
    if s["restarts"]:
        click.echo(f"  survived {s['restarts']} worker failure(s); {s['redone_steps']} step(s) redone")
    if s["skipped_columns"]:
        click.echo(f"  columns left out: {', '.join(f'{k} ({v})' for k, v in s['skipped_columns'].items())}")
    click.echo(f"  run {s['run_id']} (resume with `lakeray train --resume {s['run_id']}`)")
