"""The `modelplane` command: run the stack or one service, and manage models."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from modelplane.common.errors import ModelplaneError
from modelplane.common.logging import configure_logging
from modelplane.common.tls import set_identity
from modelplane.common.types import Model, ModelSpec, ModelState, Priority, Task

if TYPE_CHECKING:
    from modelplane.registry.client import RegistryClient
    from modelplane.registry.fleet import Node, Placement
    from modelplane.registry.statistics import ModelStatistics

app = typer.Typer(help="modelplane: serve your own models to a private Dify deployment.", no_args_is_help=True)
models_app = typer.Typer(help="Register, load, unload and inspect models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
nodes_app = typer.Typer(help="Inspect and drain the nodes (Triton + loader) that hold models.", no_args_is_help=True)
app.add_typer(nodes_app, name="nodes")
certs_app = typer.Typer(help="Certificates for mTLS between the services.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")
console = Console(stderr=True)

SERVICES = ("registry", "loader", "inference", "gateway")
RegistryOption = Annotated[str, typer.Option(envvar="MODELPLANE_CLI_REGISTRY", help="host:port of the registry.")]
LoaderOption = Annotated[str, typer.Option(envvar="MODELPLANE_CLI_LOADER", help="host:port of the loader.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")]


def _run(work: Coroutine[Any, Any, None]) -> None:
    """Runs one command's work; a refusal from a service is printed as its message, not a trace.
    Log lines go to stderr, so that stdout holds only the command's output (`--json`)."""
    configure_logging("cli")
    try:
        asyncio.run(work)
    except ModelplaneError as error:
        console.print(f"[red]error:[/red] {error.message}")
        raise typer.Exit(1) from None


@app.command()
def up(
    bundled: Annotated[bool, typer.Option(help="Register and load the bundled models.")] = True,
) -> None:
    """Start the whole embedded stack: Triton, registry, loader, inference and gateway."""
    from modelplane.stack import run_stack  # noqa: PLC0415 - keeps `modelplane models` light

    configure_logging("up")
    asyncio.run(run_stack(load_bundled=bundled))


@app.command()
def serve(service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICES)}.")]) -> None:
    """Run one service in this process (the production way: one service per container)."""
    from modelplane.common.service import run_service  # noqa: PLC0415

    if service not in SERVICES:
        console.print(f"[red]error:[/red] unknown service {service!r}; choose one of {', '.join(SERVICES)}")
        raise typer.Exit(2)
    configure_logging(service)
    set_identity(service)
    if service == "registry":
        from modelplane.registry.server import RegistryService as ServiceClass  # noqa: PLC0415
    elif service == "loader":
        from modelplane.loader.server import LoaderService as ServiceClass  # type: ignore[assignment]  # noqa: PLC0415
    elif service == "inference":
        from modelplane.inference.server import InferenceService as ServiceClass  # type: ignore[assignment]  # noqa: PLC0415
    else:
        from modelplane.gateway.server import GatewayService as ServiceClass  # type: ignore[assignment]  # noqa: PLC0415

    run_service(ServiceClass)


@app.command()
def digest(path: Annotated[Path, typer.Argument(help="A package directory or a single model file.")]) -> None:
    """Print the SHA-256 to register as a package's expected digest.

    The loader's own computation: the same files (SHA256SUMS and SHA256SUMS.sig beside the
    package are left out, links out of the package are refused), the same digest.
    """
    from modelplane.loader.manifest import package_digest  # noqa: PLC0415
    from modelplane.loader.sources.local import LocalSource  # noqa: PLC0415

    if not path.exists():
        console.print(f"[red]error:[/red] {path} does not exist; give a package directory or a model file.")
        raise typer.Exit(1)
    try:
        manifest = LocalSource(str(path), path).manifest_now()
    except ModelplaneError as error:
        console.print(f"[red]error:[/red] {error.message}")
        raise typer.Exit(1) from None
    print(package_digest(manifest))


@certs_app.command("init")
def certs_init(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to write ca.crt and <service>.crt/.key (MODELPLANE_TLS_DIR).")
    ] = Path("tls"),
    namespace: Annotated[
        str, typer.Option(help="Kubernetes namespace; adds <service>.<namespace>.svc names to each certificate.")
    ] = "",
    dns: Annotated[list[str] | None, typer.Option(help="Another DNS name for every certificate (repeatable).")] = None,
    force: Annotated[bool, typer.Option(help="Replace the CA and every certificate.")] = False,
) -> None:
    """Create a development CA and a certificate for each service (and one for this CLI).

    Existing files are kept (run it again after adding a service); --force starts over.
    """
    from modelplane.certs import init_certificates  # noqa: PLC0415 - cryptography only when needed

    issued = init_certificates(directory, namespace=namespace, extra_dns=dns or [], force=force)
    for name in issued.created:
        console.print(f"created {directory / name}.crt and {name}.key")
    for name in issued.kept:
        console.print(f"kept    {directory / name}.crt (exists; --force replaces it)")
    console.print(
        f"Turn mTLS on for every service and this CLI with MODELPLANE_TLS_DIR={directory.resolve()}; "
        "keep ca.key out of the deployment."
    )


def _default_registry() -> str:
    return (
        os.environ.get("MODELPLANE_CLI_REGISTRY") or f"localhost:{os.environ.get('MODELPLANE_REGISTRY_PORT', '50051')}"
    )


def _default_loader() -> str:
    return os.environ.get("MODELPLANE_CLI_LOADER") or f"localhost:{os.environ.get('MODELPLANE_LOADER_PORT', '50052')}"


def _capabilities(model: Model) -> str:
    """A generation model's context and capabilities, once the loader has staged it."""
    profile = model.status.profile
    if model.spec.task != Task.GENERATION or profile is None:
        return "-"
    caps = profile.capabilities
    names = [n for n in ("tools", "json_schema", "reasoning", "vision") if caps is not None and getattr(caps, n)]
    return f"ctx {profile.context_length}" + (f"; {', '.join(names)}" if names else "")


@models_app.command("ls")
def models_ls(registry: RegistryOption = "", loader: LoaderOption = "", as_json: JsonOption = False) -> None:
    """List models with their state, priority, footprint, last use, capabilities and where their copies are,
    then the memory budget."""
    from modelplane.loader.client import LoaderClient  # noqa: PLC0415
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415

    async def run() -> None:
        async with RegistryClient(registry or _default_registry()) as client:
            models = await client.list_models()
            statistics = {s.model_name: s for s in await client.statistics()}
            placements = await client.list_placements()
            nodes = {n.node_id: n for n in await client.list_nodes()}
        budget = None
        try:
            async with LoaderClient(loader or _default_loader(), timeout_seconds=5.0) as client:
                budget = await client.budget()
        except ModelplaneError as error:
            console.print(f"[yellow]budget unavailable:[/yellow] {error.message}")
        held = {h.model_name: h for d in budget.devices for h in d.holders} if budget else {}
        copies = {m.name: _copies(m, [p for p in placements if p.model_name == m.name], nodes) for m in models}
        if as_json:
            rows = [_model_json(m, statistics.get(m.name), copies[m.name]) for m in models]
            devices = [d.model_dump(mode="json") for d in budget.devices] if budget else None
            print(json.dumps({"models": rows, "budget": devices}, indent=2))
            return
        now = datetime.now(UTC)
        table = Table(
            "NAME",
            "TASK",
            "STATE",
            "PRIORITY",
            "FOOTPRINT",
            "LAST USED",
            "REQUESTS",
            "COPIES",
            "WHERE",
            "CAPABILITIES",
            "REASON",
        )
        for m in models:
            holder = held.get(m.name)
            if holder is not None:
                footprint = _size(holder.bytes) + ("" if holder.measured else " (est.)")
            else:
                footprint = _size(m.status.footprint_bytes) if m.status.footprint_bytes else "-"
            stats = statistics.get(m.name)
            last = stats.last_request_time if stats else None
            where = copies[m.name]
            table.add_row(
                m.name,
                m.spec.task.name.lower(),
                m.state.name,
                m.spec.effective_priority.name.lower(),
                footprint,
                _ago(now - last) if last else "never",
                str(stats.total_requests) if stats else "0",
                f"{sum(c['ready'] for c in where)}/{len(where)}" if where else "-",
                ", ".join(c["node_id"] if c["ready"] else f"{c['node_id']}:{c['state']}" for c in where) or "-",
                _capabilities(m),
                m.status.reason[:60],
            )
        out = Console()
        out.print(table)
        if budget is not None:
            for d in budget.devices:
                free = d.capacity_bytes - d.used_bytes
                line = (
                    f"budget {d.device}: {_size(d.used_bytes)} used of {_size(d.capacity_bytes)} "
                    f"({_size(free)} free; device {_size(d.total_bytes)})"
                )
                if d.shared_bytes:
                    line += f"; {_size(d.shared_bytes)} of it the runtime the models share"
                if d.claimed_bytes:
                    line += f"; {_size(d.claimed_bytes)} claimed by waiting loads"
                out.print(line)
            if budget.loads_waiting:
                out.print(f"loads waiting: {budget.loads_waiting}")

    _run(run())


def _copies(model: Model, placements: Sequence[Placement], nodes: dict[str, Node]) -> list[dict[str, Any]]:
    """Where a model's copies are: one entry per placement, READY ones first. A copy counts as
    ready only while its node is alive and its state was reported by the node's current process."""
    now = datetime.now(UTC)
    entries = []
    for p in placements:
        node = nodes.get(p.node_id)
        current = node is not None and node.lease_valid(now) and p.status.incarnation == node.incarnation
        state = p.status.state.name if current else ("LOST" if node is None or not node.lease_valid(now) else "-")
        entries.append(
            {
                "node_id": p.node_id,
                "state": state,
                "ready": current and p.status.state == ModelState.READY and p.status.version == model.version,
                "version": p.version,
                "generation": p.generation,
                "observed_generation": p.status.observed_generation,
                "footprint_bytes": p.status.footprint_bytes,
            }
        )
    return sorted(entries, key=lambda e: (not e["ready"], e["node_id"]))


def _model_json(model: Model, stats: ModelStatistics | None, copies: list[dict[str, Any]]) -> dict[str, Any]:
    last = stats.last_request_time if stats else None
    return {
        "name": model.name,
        "task": model.spec.task.name.lower(),
        "version": model.version,
        "state": model.state.name,
        "desired_state": model.desired_state.name,
        "priority": model.spec.effective_priority.name.lower(),
        "footprint_bytes": model.status.footprint_bytes,
        "last_request_time": last.isoformat() if last else None,
        "requests": stats.total_requests if stats else 0,
        "reason": model.status.reason,
        "capabilities": _capabilities(model),
        "copies": {"ready": sum(c["ready"] for c in copies), "placed": len(copies)},
        "nodes": copies,
    }


@nodes_app.command("ls")
def nodes_ls(registry: RegistryOption = "", as_json: JsonOption = False) -> None:
    """List nodes with their state, lease age, budget per device and the models they hold."""
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415

    async def run() -> None:
        async with RegistryClient(registry or _default_registry()) as client:
            nodes = await client.list_nodes()
            placements = await client.list_placements()
        now = datetime.now(UTC)
        rows = [_node_json(n, [p for p in placements if p.node_id == n.node_id], now) for n in nodes]
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        if not rows:
            print(
                "No nodes are registered: this is a single node (make run), which holds its models "
                "itself; `modelplane models ls` shows them. Nodes register on a fleet (MODELPLANE_NODES=2 "
                "make run, or MODELPLANE_LOADER_FLEET=true)."
            )
            return
        table = Table("NODE", "STATE", "LEASE", "DEVICES (USED / FREE)", "MODELS", "LOADER", "TRITON")
        for row in rows:
            age = row["lease_age_seconds"]
            lease = (
                f"renewed {_ago(timedelta(seconds=age))}"
                if row["state"] != "LOST"
                else (f"expired {_ago(timedelta(seconds=-row['lease_expires_in_seconds']))}")
            )
            devices = "\n".join(
                f"{d['device']}: {_size(d['used_bytes'])} / {_size(d['free_bytes'])}" for d in row["devices"]
            )
            held = ", ".join(f"{m['name']}:{m['state']}" for m in row["models"])
            table.add_row(
                row["node_id"],
                row["state"],
                lease,
                devices or "-",
                held or "-",
                row["loader_address"],
                row["triton_address"],
            )
        Console().print(table)

    _run(run())


def _node_json(node: Node, placements: Sequence[Placement], now: datetime) -> dict[str, Any]:
    renewed = node.lease_renew_time or now
    expires = node.lease_expire_time or now
    return {
        "node_id": node.node_id,
        "state": node.state.name,
        "draining": node.draining,
        "incarnation": node.incarnation,
        "holder": node.holder,
        "loader_address": node.loader_address,
        "triton_address": node.triton_address,
        "labels": node.labels,
        "lease_age_seconds": round((now - renewed).total_seconds(), 3),
        "lease_expires_in_seconds": round((expires - now).total_seconds(), 3),
        "devices": [{**d.model_dump(mode="json"), "free_bytes": d.free_bytes} for d in node.devices],
        "models": [
            {
                "name": p.model_name,
                "version": p.version,
                # A state reported by an earlier process of the node says nothing of what it holds now.
                "state": p.status.state.name if p.status.incarnation == node.incarnation else "PLACED",
                "generation": p.generation,
                "observed_generation": p.status.observed_generation,
                "footprint_bytes": p.status.footprint_bytes,
            }
            for p in placements
        ],
    }


@nodes_app.command("drain")
def nodes_drain(
    node_id: Annotated[
        str, typer.Argument(envvar="MODELPLANE_NODE_ID", help="The node's id (in Kubernetes its pod's name).")
    ],
    cancel: Annotated[bool, typer.Option(help="Take the node back into service instead.")] = False,
    wait: Annotated[
        bool,
        typer.Option(
            help="Then wait until every model the node serves (a READY copy) is READY on another live node too: "
            "what a pod's preStop hook needs before it lets the node go."
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="With --wait: give up after this many seconds (exit 1), naming what did not move.")
    ] = 600.0,
    registry: RegistryOption = "",
) -> None:
    """Drain a node: the placer moves its copies elsewhere and places nothing new on it."""
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415

    if wait and cancel:
        raise typer.BadParameter("--wait waits for a drain to finish; it cannot go with --cancel", param_hint="--wait")

    async def run() -> None:
        async with RegistryClient(registry or _default_registry()) as client:
            node = await client.drain_node(node_id, cancel=cancel)
            console.print(f"{node.node_id}: {node.state.name}")
            if wait:
                await _wait_drained(client, node_id, timeout)

    _run(run())


async def _wait_drained(client: RegistryClient, node_id: str, limit_seconds: float) -> None:
    """Returns once nothing the node serves is served only there; raises typer.Exit(1) when that
    cannot happen (no other live node) or did not happen within `limit_seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_seconds
    waiting: list[str] = []
    while True:
        alone, others = await _served_only_here(client, node_id)
        if not alone:
            console.print(f"{node_id}: drained; every model it served is READY on another node")
            return
        if not others:
            console.print(
                f"[red]error:[/red] {node_id} is the only live node that is not draining, so nothing can take "
                f"its copies of {', '.join(alone)}: they are unavailable until a node joins or this one returns"
            )
            raise typer.Exit(1)
        if loop.time() >= deadline:
            console.print(
                f"[red]error:[/red] after {limit_seconds:g} s, {', '.join(alone)} still had no READY copy but on "
                f"{node_id}: the placer found no room for them elsewhere (see `modelplane models ls`), or "
                "their loads take longer (raise --timeout and the pod's terminationGracePeriodSeconds)"
            )
            raise typer.Exit(1)
        if alone != waiting:
            console.print(f"{node_id}: waiting for a READY copy elsewhere of {', '.join(alone)}")
            waiting = alone
        await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))


async def _served_only_here(client: RegistryClient, node_id: str) -> tuple[list[str], list[str]]:
    """The models with a READY copy on this node and on no other live node; and the live nodes,
    other than this one and not draining, that could take copies."""
    from modelplane.registry.fleet import NodeState  # noqa: PLC0415

    nodes = {n.node_id: n for n in await client.list_nodes()}
    others = sorted(i for i, n in nodes.items() if i != node_id and n.state == NodeState.LIVE)
    versions = {m.name: m.version for m in await client.list_models()}

    def serving(placement: Placement) -> bool:  # the routing rule: READY, this process, current version
        node = nodes.get(placement.node_id)
        return (
            node is not None
            and node.state != NodeState.LOST
            and placement.status.state == ModelState.READY
            and placement.status.incarnation == node.incarnation
            and placement.status.version == versions.get(placement.model_name)
        )

    here = sorted(p.model_name for p in await client.list_placements(node_ids=[node_id]) if serving(p))
    if not here:
        return [], others
    elsewhere = {
        p.model_name
        for p in await client.list_placements(model_names=here)
        if p.node_id != node_id and serving(p) and nodes[p.node_id].state == NodeState.LIVE
    }
    return [name for name in here if name not in elsewhere], others


@nodes_app.command("delete")
def nodes_delete(node_id: str, registry: RegistryOption = "") -> None:
    """Forget a LOST node and its placements (after the fleet was scaled in)."""
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415

    async def run() -> None:
        async with RegistryClient(registry or _default_registry()) as client:
            await client.delete_node(node_id)
        console.print(f"{node_id}: deleted")

    _run(run())


def _size(value: int) -> str:
    return f"{value / 2**30:.1f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _ago(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


@models_app.command("register")
def models_register(
    name: Annotated[str, typer.Argument(help="Name clients will use.")],
    source: Annotated[str, typer.Option(help="Path, file://, s3:// or http(s):// URI of the package.")],
    task: Annotated[str, typer.Option(help="embedding, rerank, generation, speech2text or tts.")],
    sha256: Annotated[str, typer.Option(help="Expected SHA-256 (see `modelplane digest`).")] = "",
    priority: Annotated[str, typer.Option(help="pinned, high, normal or low.")] = "normal",
    load: Annotated[bool, typer.Option(help="Load it right away.")] = False,
    registry: RegistryOption = "",
) -> None:
    """Register a model (or a new version of one)."""
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415

    try:
        spec = ModelSpec(
            name=name,
            task=Task[task.upper()],
            source_uri=source,
            expected_sha256=sha256,
            priority=Priority[priority.upper()],
        )
    except KeyError as error:
        console.print(f"[red]error:[/red] unknown value {error}")
        raise typer.Exit(2) from None

    async def run() -> None:
        async with RegistryClient(registry or _default_registry()) as client:
            model, created = await client.register(spec, load=load)
        verb = "registered" if created else "unchanged"
        console.print(f"{model.name}: {verb} (version {model.version}, {model.state.name})")

    _run(run())


@models_app.command("load")
def models_load(name: str, loader: LoaderOption = "", refresh: bool = False) -> None:
    """Load a model into Triton, showing progress, and print the time of each phase."""
    from modelplane.loader.client import LoaderClient  # noqa: PLC0415

    async def run() -> None:
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
        ]
        async with LoaderClient(loader or _default_loader()) as client:
            with Progress(*columns, console=console) as progress:
                bar = progress.add_task(name, total=None)
                async for update in client.load(name, refresh=refresh):
                    p = update.progress
                    files = f" {p.files_done}/{p.files_total} files" if p.files_total else ""
                    detail = p.current_file or p.message  # between files, what the phase is doing
                    progress.update(
                        bar,
                        description=f"{name}: {p.phase.name.lower()}{files} {detail}".strip(),
                        completed=p.bytes_done,
                        total=p.bytes_total or None,
                    )
                    if update.done:
                        final = update
        state = final.model.state if final.model else ModelState.UNSPECIFIED
        console.print(f"{name}: {state.name}")
        for phase in final.phase_durations:
            console.print(f"  {phase.phase.name.lower():<11} {phase.duration.total_seconds():8.2f} s")
        total = sum(phase.duration.total_seconds() for phase in final.phase_durations)
        console.print(f"  {'total':<11} {total:8.2f} s")

    _run(run())


@models_app.command("unload")
def models_unload(name: str, loader: LoaderOption = "") -> None:
    """Unload a model from Triton; its files stay cached for a fast reload."""
    from modelplane.loader.client import LoaderClient  # noqa: PLC0415

    async def run() -> None:
        async with LoaderClient(loader or _default_loader()) as client:
            model = await client.unload(name)
        console.print(f"{name}: {model.state.name}")

    _run(run())


@models_app.command("events")
def models_events(name: str, registry: RegistryOption = "") -> None:
    """Show a model's lifecycle transitions."""
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415

    async def run() -> None:
        async with RegistryClient(registry or _default_registry()) as client:
            events = await client.events(name)
        table = Table("TIME", "VERSION", "FROM", "TO", "MESSAGE")
        for e in events:
            when = e.create_time.isoformat(timespec="seconds") if e.create_time else ""
            table.add_row(when, str(e.version), e.from_state.name, e.to_state.name, e.message)
        Console().print(table)

    _run(run())


@models_app.command("delete")
def models_delete(name: str, registry: RegistryOption = "") -> None:
    """Remove an unloaded model from the catalogue."""
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415

    async def run() -> None:
        async with RegistryClient(registry or _default_registry()) as client:
            await client.delete(name)
        console.print(f"{name}: deleted")

    _run(run())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
