import json

import click

from lakeray.cli.main import settings_from

_LABELS = {
    "spark": "start Spark (Delta from cached jars)",
    "data": "generate transactions → Delta",
    "features": "feature job customer_aggregates (quality gate) → Delta",
    "training_set": "point-in-time training set + manifest",
    "ray": "start Ray",
    "train": "XGBoost on Ray (jobs/training/fraud_xgboost.yaml) → MLflow",
    "serve": "deploy champion on Ray Serve",
    "predict": "HTTP predictions",
}


@click.command()
@click.option("--rows", type=click.IntRange(min=1000), default=200_000, show_default=True,
              help="Transactions to generate.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (nothing else on stdout).")
@click.option("--keep-serving", is_flag=True, help="Keep the endpoint up after the demo until Ctrl-C.")
@click.option("--train-workers", type=click.IntRange(min=1), default=None,
              help="Training workers (the example spec's scaling.num_workers otherwise) [1].")
@click.option("--train-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs per training worker (the example spec's scaling.cpus_per_worker otherwise) [2].")
@click.pass_context
def demo(ctx: click.Context, rows: int, seed: int, as_json: bool, keep_serving: bool,
         train_workers: int | None, train_cpus: int | None) -> None:
    """Run the whole path on the current profile and print a summary."""
    import time

    from rich.console import Console

    from lakeray.demo import STAGES, run_demo

    settings = settings_from(ctx)
    # With --json, stdout carries only the JSON object; progress goes to stderr.
    console = Console(stderr=True) if as_json else Console()
    status = console.status("starting")
    status.start()
    done: list[str] = []

    def progress(stage: str, event: str) -> None:
        if event == "start":
            status.update(f"[{len(done) + 1}/{len(STAGES)}] {_LABELS[stage]} …")
        elif event == "done":
            done.append(stage)
            console.print(f"[green]✓[/] {_LABELS[stage]}")
        else:  # a note about the stage
            from rich.markup import escape

            console.print(f"[yellow]![/] {escape(event)}", highlight=False)

    def report(result) -> None:
        if as_json:
            click.echo(json.dumps(result.as_dict()))
        else:
            _print_summary(console, result)

    def hold(result) -> None:
        # The summary first: it names the model and the endpoint the user is about to query.
        status.stop()
        report(result)
        console.print(f"serving at {result.endpoint}/predict — Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print("stopping Ray and the endpoint")

    try:
        result = run_demo(settings, rows=rows, seed=seed, progress=progress,
                          serve_forever=hold if keep_serving else None,
                          train_workers=train_workers, train_cpus=train_cpus)
    finally:
        status.stop()
    if not keep_serving:
        report(result)


def _print_summary(console, result) -> None:
    from rich.table import Table

    summary = Table(title="lakeray demo", show_header=False)
    summary.add_row("rows generated", f"{result.rows:,} → {result.source_table}@{result.source_table_version}")
    summary.add_row("feature table", f"{result.feature_table}@{result.feature_table_version} "
                                     f"({result.feature_rows:,} rows, {len(result.features)} features)")
    summary.add_row("training set", f"{result.training_set}@{result.training_set_version} "
                                    f"({result.training_set_rows:,} rows, hash {result.training_set_hash})")
    summary.add_row("quality gate", ", ".join(f"{k} {'ok' if v else 'WARN'}" for k, v in result.feature_checks.items()))
    summary.add_row("held-out AUC", f"{result.auc:.4f} on {result.test_rows:,} rows")
    summary.add_row("model", f"{result.model_uri} → version {result.model_version} (run {result.run_id})")
    summary.add_row("training", f"boosting {result.train_s:.1f} s + start-up {result.train_startup_s:.1f} s "
                                f"(of which Delta read {result.train_load_s:.1f} s)")
    summary.add_row("endpoint", f"{result.endpoint}/predict")
    summary.add_row("seconds per stage", ", ".join(f"{k} {v:.1f}" for k, v in result.stage_seconds.items()))
    console.print(summary)
    preds = Table("transaction_id", "is_fraud", "fraud probability", title="predictions over HTTP")
    for p in result.predictions:
        preds.add_row(str(p["transaction_id"]), str(p["is_fraud"]), f"{p['fraud_probability']:.4f}")
    console.print(preds)
