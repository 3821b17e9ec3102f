import json
from typing import Any

import click

from lakeray.cli.main import settings_from


@click.group()
def models() -> None:
    """Registered models: list them, show one, trace its lineage, promote a challenger to champion.

    A model is NAME@alias, NAME/version, or NAME alone (= NAME@champion).
    """


def _when(ms: int | None) -> str:
    import datetime as dt

    return "" if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _value(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array instead of a table.")
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every registered model and version: aliases, training set@version, held-out metric."""
    from lakeray.training.lineage import list_models

    found = list_models(settings_from(ctx))
    if as_json:
        click.echo(json.dumps(found))
        return
    from rich.console import Console
    from rich.table import Table

    out = Table("model", "version", "aliases", "kind", "trained on", "metric", "created (UTC)")
    for model in found:
        for v in model["versions"]:
            metric = f"{v['metric']} {_value(v['metric_value'])}" if v["metric"] else ""
            out.add_row(model["name"], str(v["version"]), ", ".join(v["aliases"]), v["kind"] or "", v["input"] or "",
                        metric, _when(v["created_ms"]))
    if not found:
        click.echo("no registered models (train one with `lakeray train SPEC.yaml`)")
        return
    Console().print(out)


@models.command("show")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def show(ctx: click.Context, model: str, as_json: bool) -> None:
    """One model version: aliases, its run's params, metrics and tags, and its promotion records."""
    from lakeray.training.lineage import describe_model

    found = describe_model(settings_from(ctx), model)
    if as_json:
        click.echo(json.dumps(found))
        return
    from rich.console import Console
    from rich.table import Table

    run = found["run"]
    console = Console()
    console.print(f"[bold]{found['name']}[/bold] v{found['version']}  aliases: {', '.join(found['aliases']) or '-'}  "
                  f"created {_when(found['created_ms'])} UTC")
    console.print(f"run {run['run_id']} ({run['run_name']}, {run['status']}), {run['kind'] or '?'} on "
                  f"{run['input'] or '?'}: {run['metric'] or 'metric'} {_value(run['metric_value'])}")
    for title, values in (("params", found["params"]), ("metrics", found["metrics"]), ("tags", found["tags"]),
                          ("version tags", found["version_tags"])):
        if values:
            table = Table("name", "value", title=title, title_justify="left")
            for key, value in values.items():
                table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
            console.print(table)
    if found["promotions"]:
        table = Table("when (tag)", "decision", "metric", "challenger", "champion", "rows", "on",
                      title="promotions", title_justify="left")
        for p in found["promotions"]:
            ch, cp = p.get("challenger") or {}, p.get("champion") or {}
            table.add_row(p["tag"].rsplit(".", 1)[-1], str(p.get("decision", "")), str(p.get("metric", "")),
                          f"v{ch.get('version')} {_value(ch.get('value'))}",
                          f"v{cp.get('version')} {_value(cp.get('value'))}" if cp else "-",
                          str(p.get("rows", "")), str(p.get("evaluated_on", "")))
        console.print(table)


def _label(node: dict[str, Any]) -> str:
    head = f"[bold]{node['table']}@{node['version']}[/bold]"
    if node.get("error"):
        return f"{head}  [red]{node['error']}[/red]"
    kind = node.get("written_by")
    parts = ["not written by a lakeray job: no lineage in its commit" if kind == "other" else kind or ""]
    if node.get("code_version"):
        parts.append(f"code {node['code_version']}")
    if node.get("run_id"):
        parts.append(f"run {node['run_id']}")
    if node.get("source"):
        parts.append(f"from {node['source']}")
    text = f"{head}  {', '.join(p for p in parts if p)}"
    if node.get("warning"):
        text += f"  [yellow]{node['warning']}[/yellow]"
    return text


def _grow(tree: Any, node: dict[str, Any]) -> None:
    branch = tree.add(_label(node))
    for child in node.get("upstream", []):
        _grow(branch, child)


@models.command("lineage")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def lineage_cmd(ctx: click.Context, model: str, as_json: bool) -> None:
    """MODEL → its run → training set@version → manifest → every input table@version → feature job code."""
    from lakeray.training.lineage import lineage

    found = lineage(settings_from(ctx), model)
    if as_json:
        click.echo(json.dumps(found))
        return
    from rich.console import Console
    from rich.tree import Tree

    m, run, ts = found["model"], found["run"], found["training_set"]
    aliases = f" ({', '.join(m['aliases'])})" if m["aliases"] else ""
    tree = Tree(f"[bold]{m['name']}[/bold] v{m['version']}{aliases}")
    metric = f", {run['metric']} {_value(run['metric_value'])}" if run["metric"] else ""
    node = tree.add(f"run {run['run_id']} ({run['run_name']}, {run['trainer'] or run['kind'] or '?'}, "
                    f"spec {run['spec_name']} #{run['spec_hash']}{metric})")
    manifest = f"manifest {ts['manifest']}" if ts["manifest"] else "no manifest (a plain table)"
    rows = f", {ts['rows']:,} rows" if ts.get("rows") is not None else ""
    node = node.add(f"training set [bold]{ts['table']}@{ts['version']}[/bold]  {manifest}{rows}"
                    + (f", hash {ts['content_hash']}" if ts.get("content_hash") else "")
                    + (f"  [red]{ts['error']}[/red]" if ts.get("error") else ""))
    for child in ts["upstream"]:
        _grow(node, child)
    Console().print(tree)


@models.command("promote")
@click.argument("name")
@click.option("--challenger", default="challenger", show_default=True, help="Alias of the candidate version.")
@click.option("--champion", default="champion", show_default=True, help="Alias to move when the candidate wins.")
@click.option("--force", is_flag=True, help="Move the alias even when the challenger does not win.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as one JSON object.")
@click.pass_context
def promote_cmd(ctx: click.Context, name: str, challenger: str, champion: str, force: bool, as_json: bool) -> None:
    """Move CHAMPION to CHALLENGER's version if it is strictly better on the same held-out rows.

    Both versions are scored on the challenger's held-out rows (its training set@version and split)
    on the spec's metric; the comparison is recorded on both versions. Exits 1 when refused.
    """
    from lakeray.training.promotion import PromotionRefused, promote

    try:
        result = promote(settings_from(ctx), name, challenger, champion, force)
    except PromotionRefused as exc:
        if exc.result is not None:
            _print_comparison(exc.result, as_json)
        raise
    _print_comparison(result, as_json)


def _print_comparison(result: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    better = "higher" if result.direction == "max" else "lower"
    table = Table("", "version", result.metric, "note",
                  title=f"{result.model_name}: {result.rows:,} held-out rows of {result.evaluated_on} "
                        f"({better} is better)", title_justify="left")
    for contender in (result.challenger, result.champion):
        if contender is not None:
            table.add_row(contender.alias, f"v{contender.version}", _value(contender.value) or "n/a", contender.note)
    console = Console()
    console.print(table)
    if result.decision != "refused":  # a refusal's headline is the error line main() prints
        colour = "green" if result.promoted else "yellow"
        console.print(f"[{colour}]{result.decision}[/{colour}]: {result.headline}")
