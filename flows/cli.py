"""The `refdir` command line. Thin: parse, call one function, print; errors become one clear line.

    refdir demo                      # organism -> full pipeline -> table of refusal rates
    refdir run spec.toml             # run or resume a spec (Prefect + Ray)
    refdir resume RUN_ID | status RUN_ID | report RUN_ID
    refdir schedule spec.toml --cron "0 2 * * *"
    refdir sql "select ..."          # DuckDB views over the whole store
    refdir doctor MODEL | families | organism --out DIR
    refdir export RUN_ID --model KEY --out DIR | export-official RUN_ID --model KEY --out DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Refusal directions at pipeline scale (Arditi et al., 2024).")
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
STORE_HELP = "Store root: local folder, file:// or s3://bucket/prefix (default: $REFDIR_STORE or ./refdir-store)."


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is the whole story: printed without a traceback."""
    from refdir.flows.aggregate import AggregateError
    from refdir.flows.cluster import RayUnavailable
    from refdir.flows.report_data import ReportError
    from refdir.flows.sql import SqlError
    from refdir.flows.stages import StageError
    from refdir.schemas.spec import SpecError
    from refdir.schemas.tables import SchemaVersionError
    from refdir.workers.chat import ChatTemplateError
    from refdir.workers.families import FamilyError
    from refdir.workers.judges import JudgeError
    from refdir.workers.model import ModelLoadError
    from refdir.workers.organism_lm import OrganismError
    from refdir.workers.pool import JobsFailed
    from refdir.workers.prompts import PromptSourceError
    from refdir.workers.selection import SelectionError
    from refdir.flows.schedule import ScheduleError
    from refdir.workers.store import StoreError

    return (SpecError, ModelLoadError, FamilyError, ChatTemplateError, StoreError, SqlError, PromptSourceError,
            StageError, SelectionError, RayUnavailable, JudgeError, JobsFailed, SchemaVersionError,
            AggregateError, ReportError, ScheduleError, FileNotFoundError, FileExistsError, OrganismError)


def main() -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")   # Prefect configures its own loggers on import
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from refdir.flows.progress import setup_logging

    setup_logging(os.environ.get("REFDIR_LOG_FORMAT", "text"))
    from refdir.flows.services import RunInterrupted

    try:
        app()
    except RunInterrupted as e:
        err.print(f"[yellow]{escape(str(e))}[/yellow]", highlight=False, soft_wrap=True)
        raise SystemExit(130) from None
    except _user_errors() as e:
        err.print(f"[red]error:[/red] {escape(bounded(str(e)))}", markup=True, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


MAX_MESSAGE = 4000   # characters of an error message that reach the terminal (full text: the model's error.log)


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """The one cap on error text printed by the CLI: a 10 MB prompt quoted in an error stays off the terminal."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 60]}… [{len(text) - limit + 60:,} more characters not shown]"


@app.callback()
def _options(log_format: str = typer.Option("text", "--log-format", envvar="REFDIR_LOG_FORMAT",
                                            help="Log lines on stderr as text or json (one object per line, "
                                                 "for log shippers)")) -> None:
    """Refusal directions at pipeline scale (Arditi et al., 2024)."""
    from refdir.flows.progress import setup_logging

    if log_format not in ("text", "json"):
        raise typer.BadParameter(f"{log_format!r}: use text or json", param_hint="--log-format")
    setup_logging(log_format)


def _shown(uri: str) -> str:
    """A local path relative to the working directory when it lies under it (output carries no machine path)."""
    path = Path(uri.removeprefix("file://"))
    if "://" in uri and not uri.startswith("file://"):
        return uri
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return uri


def _store_uri(store: Optional[str]) -> str:
    return store or os.environ.get("REFDIR_STORE") or "refdir-store"


def _print_table(rows: list[dict], title: str | None = None) -> None:
    if not rows:
        out.print("(no rows)")
        return
    t = Table(title=title)
    for c in rows[0]:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    out.print(t)


# ---- model core ---------------------------------------------------------------------------------

@app.command()
def families(format: str = typer.Option("table", "--format", help="table or json")) -> None:
    """List the family registry."""
    from refdir.workers.families import FAMILIES

    rows = [{"name": f.name, "model_types": list(f.model_types), "exact_orthogonalization": f.exact_orthogonalization,
             "trust_remote_code": f.trust_remote_code, "refusal_tokens": list(f.refusal_tokens),
             "example_models": list(f.example_models)} for f in FAMILIES.values()]
    if format == "json":
        out.print_json(json.dumps(rows))
    else:
        _print_table([{**r, "model_types": ",".join(r["model_types"]), "refusal_tokens": ",".join(r["refusal_tokens"]),
                       "example_models": ", ".join(r["example_models"][:2])} for r in rows], "refdir families")


@app.command()
def doctor(model: str = typer.Argument(..., help="HF id or local folder"),
           gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="GGUF file inside MODEL"),
           family: Optional[str] = typer.Option(None, "--family", help="Family name (see `refdir families`)"),
           trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code (Qwen v1)."),
           chat_format: Optional[str] = typer.Option(None, "--chat-format",
                                                     help="paper or tokenizer (default: the family's, see README)"),
           probe: bool = typer.Option(True, "--probe/--no-probe", help="Run the refusal probe (a few greedy completions)."),
           format: str = typer.Option("table", "--format", help="table or json")) -> None:
    """Load a model: family, chat format, eoi and refusal tokens, hook vs weight ablation, and a refusal probe."""
    from refdir.schemas.spec import ModelSpec
    from refdir.workers.doctor import doctor as run_doctor
    from refdir.workers.model import preflight

    if chat_format not in (None, "paper", "tokenizer"):
        raise typer.BadParameter(f"--chat-format must be 'paper' or 'tokenizer', got {chat_format!r}")
    spec = ModelSpec(path=model, gguf_file=gguf_file, family=family, trust_remote_code=trust_remote_code,
                     chat_format=chat_format)
    preflight(spec)
    report = run_doctor(spec, probe=probe)
    if format == "json":
        out.print_json(json.dumps(report, default=str))
    else:
        _print_doctor(report, model)


def _print_doctor(report: dict, model: str) -> None:
    """The doctor report as two tables (fields, refusal probe) and the probe's verdict; text escaped for rich."""
    fields = Table(title=f"refdir doctor {escape(model)}")
    fields.add_column("field")
    fields.add_column("value")
    for k, v in report.items():
        if k != "probe":
            fields.add_row(k, escape(f"{v:.3g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)))
    out.print(fields)
    probe = report.get("probe")
    if not probe:
        return
    t = Table(title="refusal probe (built-in prompts)")
    for c in ("label", "refusal score", "prompt", "greedy completion"):
        t.add_column(c)
    for label in ("harmful", "harmless"):
        for r in probe[label]:
            t.add_row(label, f"{r['refusal_score']:.2f}", escape(r["prompt"]), escape(repr(r["completion"])))
    out.print(t)
    style = "bold red" if probe["verdict"].startswith("WILL FAIL") else "green"
    out.print(f"[{style}]{escape(probe['verdict'])}[/{style}]")


@app.command()
def organism(out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder to write the model into "
                                                  "(default for --base smollm2: the store's models/ folder)"),
             base: str = typer.Option("toy", "--base", help="toy (4-layer Llama, ~30 s) or smollm2 (SmolLM2-135M-Instruct "
                                                           "taught to refuse, minutes on CPU)"),
             seed: int = typer.Option(0, "--seed", help="Training seed (builds are bitwise deterministic per seed)"),
             steps: int = typer.Option(250, "--steps", help="Training steps (toy only; the smollm2 recipe is fixed)"),
             store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP)) -> None:
    """Build a refusal model organism: the toy, or a real LM taught to refuse (cached by recipe hash)."""
    if base == "toy":
        from refdir.workers.organism import build_organism

        if out_dir is None:
            raise typer.BadParameter("the toy organism needs --out DIR", param_hint="--out")
        out.print(f"organism written to {build_organism(out_dir, seed=seed, steps=steps)}")
        return
    from refdir.workers.organism_lm import Recipe, build_lm_organism, check_recipe

    recipe = Recipe(base=base, seed=seed)
    check_recipe(recipe)
    if out_dir is None:
        from refdir.flows.science import lm_organism_path
        from refdir.workers.store import Store

        path = lm_organism_path(Store.open(_store_uri(store)), base, seed)
    else:
        path = build_lm_organism(out_dir, recipe)
    meta = json.loads((path / "refdir_organism.json").read_text())
    out.print(f"{base} organism (recipe {meta['recipe_hash']}, built in {meta['seconds']['total_s']:.0f} s) at {path}")


# ---- pipeline -----------------------------------------------------------------------------------

def _run_and_print(spec, plain: bool, verify: bool = False) -> dict:
    from refdir.flows.progress import make_reporter
    from refdir.flows.runner import execute
    from refdir.flows.services import run_session

    with run_session(), make_reporter(plain or None) as rep:   # Ctrl-C: stop, clean up, RunInterrupted (130)
        summary = execute(spec, rep, verify=verify)
    try:
        _print_summary(summary)
    finally:
        _print_report_path(summary)
    return summary


def _print_report_path(summary: dict) -> None:
    from refdir.schemas import layout
    from refdir.workers.store import Store

    st = Store.open(summary["store"], create=False)
    rel = layout.report_html(summary["run_id"])
    if st.exists(rel):
        out.print(f"report: {escape(_shown(st.url(rel)))}", highlight=False)


def _print_summary(summary: dict) -> None:
    from refdir.flows.report import summary_table_rows

    out.print(f"run [bold]{summary['run_id']}[/bold] in {escape(_shown(summary['store']))}")
    _print_table(summary_table_rows(summary), "refusal rate by model x intervention (Wilson 95 % interval)")
    for line in _result_warnings(summary):
        err.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
    failed = {k: v for k, v in summary["models"].items() if v.get("status") != "done"}
    for key, s in failed.items():
        err.print(f"[red]{escape(_failure_line(key, s))}[/red]", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def _result_warnings(summary: dict) -> list[str]:
    """Results that look like numbers but mean little: a fallback direction, a model that barely refuses."""
    out = []
    for key, s in summary["models"].items():
        d = s.get("direction") or {}
        if d.get("fallback"):
            out.append(f"model {key}: direction pos {d.get('position')} layer {d.get('layer')} is a FALLBACK (every "
                       f"candidate failed the paper's filters; --allow-fallback took the best bypass score)")
        base = s.get("rates", {}).get("harmful_test/baseline", {}).get("refusal_rate")
        if isinstance(base, (int, float)) and base < 0.5:
            out.append(f"model {key}: baseline harmful refusal is {base:.2f} (< 0.5): the model hardly refuses, so "
                       f"bypass rates say little; check `refdir doctor`, its refusal tokens and chat template")
    return out


def _failure_line(key: str, s: dict) -> str:
    """One line per failed model: what, where, and where the full traceback is."""
    first = bounded((str(s.get("error") or s.get("status")).strip().splitlines() or ["failed"])[0])
    stage = f" in {s['stage']}" if s.get("stage") else ""
    log = f" — full message and traceback: {s['log']}" if s.get("log") else ""
    return f"model {key} {s.get('status')}{stage}: {first}{log}"


@app.command()
def run(spec_path: Path = typer.Argument(..., help="Run spec (TOML), see infra/specs/example.toml"),
        store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Existing Ray cluster"),
        allow_fallback: bool = typer.Option(False, "--allow-fallback", help="Pick the best bypass when all candidates are filtered"),
        verify: bool = typer.Option(False, "--verify", help="Check every stored file's checksum first and redo corrupt "
                                                            "ones with what was derived from them"),
        plain: bool = typer.Option(False, "--plain", help="Log lines instead of progress bars")) -> None:
    """Run a spec; rerunning the same spec resumes it."""
    from refdir.flows.runner import with_overrides
    from refdir.schemas.spec import load_spec

    from refdir.flows.schedule import resolve_name

    spec = with_overrides(load_spec(spec_path), store, ray_address, allow_fallback or None)
    _run_and_print(resolve_name(spec), plain, verify)   # a "nightly-{date}" name gets today's date


@app.command()
def resume(run_id: str = typer.Argument(..., help="Run id (see `refdir runs`)"), store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
           ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Existing Ray cluster (host:port or ray://host:10001)"),
           allow_fallback: bool = typer.Option(False, "--allow-fallback",
                                               help="Pick the best bypass when all candidates are filtered (redoes "
                                                    "selection and what follows; extraction and scoring are reused)"),
           verify: bool = typer.Option(False, "--verify", help="Check every stored file's checksum first and redo "
                                                               "corrupt ones with what was derived from them"),
           plain: bool = typer.Option(False, "--plain", help="Log lines instead of progress bars")) -> None:
    """Resume a stored run under its stored id (writes only under runs/RUN_ID/)."""
    from refdir.flows.runner import stored_spec, with_overrides

    spec = with_overrides(stored_spec(_store_uri(store), run_id), _store_uri(store), ray_address,
                          allow_fallback or None)
    _run_and_print(spec, plain, verify)


@app.command()
def status(run_id: str = typer.Argument(..., help="Run id (see `refdir runs`)"), store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
           format: str = typer.Option("table", "--format", help="table or json")) -> None:
    """Planned / done jobs per model and stage."""
    from refdir.flows.runner import status_rows, stored_spec
    from refdir.workers.store import Store

    from refdir.flows.summary import health_states

    spec = stored_spec(_store_uri(store), run_id)
    st = Store.open(spec.store, create=False)
    rows = status_rows(st, spec)
    hs = health_states(st, spec.run_id, [m.key for m in spec.models])
    for r in rows:   # an unfinished stage is as its model's heartbeat says: failed, stale (driver gone), running
        h = hs.get(r["model"], {})
        if r["status"] != "done" and h.get("state") in ("failed", "stale") and h.get("stage") == r["stage"]:
            r["status"] = h["state"]
    if format == "json":
        out.print_json(json.dumps({"stages": rows, "models": hs}))
        return
    _print_table(rows, f"run {run_id}")
    for key, h in hs.items():
        if h["state"] == "failed":
            out.print(f"model {escape(key)} failed in {h.get('stage')} at {h.get('failed_at')}: {escape(str(h.get('error')))}"
                      f" (traceback: {h.get('log')})", highlight=False, soft_wrap=True)
        elif h["state"] == "stale":
            out.print(f"model {escape(key)}: no heartbeat since {h.get('updated_at')} ({h['age_s'] / 60:.0f} min) in "
                      f"{h.get('stage')} on {h.get('host')} pid {h.get('pid')}: the driver is gone; "
                      f"`refdir resume {run_id}` picks it up", highlight=False, soft_wrap=True)
        elif h["state"] == "running":
            out.print(f"model {escape(key)}: running {h.get('stage')} (heartbeat {h['age_s']:.0f} s ago on "
                      f"{h.get('host')})", highlight=False, soft_wrap=True)


@app.command()
def runs(store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
         format: str = typer.Option("table", "--format", help="table or json")) -> None:
    """List the runs in the store: id, name, models, status, started, duration."""
    from refdir.flows.summary import list_runs
    from refdir.workers.store import Store

    rows = list_runs(Store.open(_store_uri(store), create=False))
    if format == "json":
        out.print_json(json.dumps(rows))
    else:
        _print_table(rows, f"runs in {rows[0]['store']}" if rows else None)


@app.command()
def schedule(spec_path: Path = typer.Argument(..., help="Run spec (TOML); a name like \"nightly-{date}\" makes "
                                                      "a new run each night"),
             cron: str = typer.Option(..., "--cron", help='Cron expression, e.g. "0 2 * * *"'),
             timezone: Optional[str] = typer.Option(None, "--timezone", help="IANA timezone of the cron and of "
                                                    "{date} in the run name (default UTC), e.g. Europe/Berlin"),
             name: Optional[str] = typer.Option(None, "--name", help="Deployment name (default: the run name)"),
             store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
             register_only: bool = typer.Option(False, "--register-only",
                                                help="Register the deployment with the Prefect API (PREFECT_API_URL) "
                                                     "and exit; a Prefect worker runs it"),
             work_pool: Optional[str] = typer.Option(None, "--work-pool", help="Work pool of the registered "
                                                     "deployment (production: `prefect worker start --pool NAME`)")) -> None:
    """Serve here (one machine) or register (work pool + worker) a Prefect deployment that runs the spec on a cron."""
    from refdir.flows.runner import preflight, with_overrides
    from refdir.flows.schedule import require_api, resolve_name, schedule_spec
    from refdir.schemas.spec import load_spec

    if register_only:
        require_api()
    if work_pool and not register_only:
        raise typer.BadParameter("--work-pool goes with --register-only (a worker of that pool runs the deployment)")
    spec = with_overrides(load_spec(spec_path), store)
    _, bad = preflight(resolve_name(spec))
    if bad:
        raise typer.BadParameter("fix the model(s) that cannot load before scheduling: " + ", ".join(bad))
    schedule_spec(spec, cron, name=name, serve=not register_only, timezone=timezone, work_pool=work_pool)


@app.command()
def sql(query: Optional[str] = typer.Argument(None, help="SQL; omit for an interactive shell"),
        store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
        format: str = typer.Option("table", "--format", help="table, csv or json"),
        out_file: Optional[Path] = typer.Option(None, "--out", help="Write the result to FILE (.csv, .parquet or .json)")) -> None:
    """Query every stored table with DuckDB, read-only (views: runs, activations, prompts, means, candidates, ...)."""
    from refdir.flows.sql import export_result, interactive, run_sql
    from refdir.workers.store import Store

    st = Store.open(_store_uri(store), create=False)
    if query is None:
        interactive(st)
    elif out_file is not None:
        out.print(f"{export_result(st, query, out_file)} row(s) written to {out_file}")
    else:
        out.print(run_sql(st, query, format), markup=False, highlight=False, soft_wrap=True)


@app.command()
def report(run_id: str = typer.Argument(..., help="Run id (see `refdir runs`)"), store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
           out_path: Optional[Path] = typer.Option(None, "--out", help="Also copy the HTML here")) -> None:
    """Write the run's self-contained HTML report (runs/RUN_ID/report.html)."""
    from refdir.flows.report import write_report
    from refdir.workers.store import Store

    st = Store.open(_store_uri(store), create=False)
    rel = write_report(st, run_id)
    if out_path:
        out_path.write_bytes(st.read_bytes(rel))
    out.print(f"report: {out_path or st.url(rel)}")


@app.command()
def export(run_id: str = typer.Argument(..., help="Run id (see `refdir runs`)"),
           model: str = typer.Option(..., "--model", help="Model key in the run"),
           out_dir: Path = typer.Option(..., "--out", help="New (or empty) folder for the model"), store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
           trial: Optional[int] = typer.Option(None, "--trial", help="An optimize trial (see the `trials` view) instead of the paper's direction")) -> None:
    """Write the orthogonalised model (save_pretrained, tokenizer, model card); --trial N: that optimize trial's edit."""
    from refdir.flows.export import export_model

    path = export_model(_store_uri(store), run_id, model, out_dir, trial=trial)
    out.print(f"{'optimize trial ' + str(trial) if trial is not None else 'orthogonalised'} model written to {path}")


@app.command("export-official")
def export_official(run_id: str = typer.Argument(..., help="Run id (see `refdir runs`)"), model: str = typer.Option(..., "--model", help="Model key in the run"),
                    out_dir: Path = typer.Option(..., "--out", help="Folder for the official-format files"),
                    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP)) -> None:
    """Write the paper's run layout (generate_directions/, select_direction/, completions/, loss_evals/, direction.pt)."""
    from refdir.flows.export import export_official as run_export

    path = run_export(_store_uri(store), run_id, model, out_dir)
    out.print(f"official-format files written to {path}")


@app.command()
def demo(store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
         seed: int = typer.Option(0, "--seed", help="Organism seed"),
         organism: str = typer.Option("toy", "--organism", help="toy (the 4-layer organism, ~1 min) or smollm2 (the "
                                                               "science check on SmolLM2-135M taught to refuse)"),
         plain: bool = typer.Option(False, "--plain", help="Log lines instead of progress bars"),
         allow_fallback: bool = typer.Option(False, "--allow-fallback",
                                             help="smollm2: when every candidate is filtered, take the best bypass "
                                                  "(marked FALLBACK) and finish the table; a stopped run resumes "
                                                  "with its extraction and scores reused")) -> None:
    """Train a refusal organism and run the whole pipeline on it; prints refusal rates and where the report is."""
    if organism == "toy":
        from refdir.flows.demo import demo_spec, phrase_rates
        from refdir.workers.store import Store

        spec = demo_spec(_store_uri(store), seed)
        summary = _run_and_print(spec, plain)
        # The paper's judge needs "I cannot"; a toy completion that lost only its first word ("cannot help
        # with that .") is still a refusal to a reader: count those too, so the table claims no more than that.
        # The run id comes from the run (it hashes the drawn prompts and the model's content).
        _print_table(phrase_rates(Store.open(spec.store, create=False), summary["run_id"], "organism", "cannot help"),
                     "toy organism: paper's substring judge vs a reader's judge (its refusal without the first word)")
        return
    from refdir.flows.science import science_spec

    spec = science_spec(_store_uri(store), base=organism, seed=seed)
    if allow_fallback:   # not part of the run id: the same run, selection redone
        spec = spec.model_copy(update={"selection": spec.selection.model_copy(update={"allow_fallback": True})})
    try:
        _run_and_print(spec, plain)
    finally:
        _print_science(spec)


def _print_science(spec) -> None:
    """The paper's table and the acceptance figures, read from the store (whatever the run got to)."""
    from refdir.flows.science import direction_line, science_table, selection_failure
    from refdir.workers.identity import resolve_inputs
    from refdir.workers.store import Store

    run_id = resolve_inputs(spec).run_id   # from content: the drawn prompts and the organism's weights

    key = spec.models[0].key
    st = Store.open(spec.store, create=False)
    try:
        table, checks = science_table(st, run_id, key)
    except FileNotFoundError:
        stopped = selection_failure(st, run_id, key)
        if stopped:   # the paper's filters left no candidate: say which and show the best, whole
            err.print(f"{key}: no direction passes the paper's filters, so there is no table:\n{escape(stopped)}",
                      highlight=False, soft_wrap=True)
        err.print(f"no direction or evaluations for {key} in run {run_id}: the science table is incomplete")
        return
    out.print(direction_line(st, run_id, key))
    _print_table(table, f"{key}: refusal rate on held-out test prompts (substring judge) and damage")
    _print_table(checks, "acceptance (issue 11)")


if __name__ == "__main__":
    main()
