"""``kvtier inspect``: look inside chunk files and tier directories (logic in :mod:`kvtier.storage.inspect`).

Heavy imports stay inside the command so other ``kvtier`` commands do not load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect(
        path: Annotated[Path, typer.Argument(help="A chunk file (.kvt) or a disk/fs tier directory.")],
        verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every checksum.")] = True,
    ) -> None:
        """Print a chunk file's header, or summarize a tier directory and verify its files."""
        from rich.console import Console
        from rich.table import Table

        from kvtier.record import Kind
        from kvtier.storage.inspect import check_file, scan_dir

        console = Console()
        if path.is_dir():
            report = scan_dir(path, verify, progress=console.is_terminal)
            table = Table(title=f"kvtier tier directory {path}")
            table.add_column("what")
            table.add_column("count", justify="right")
            for label, value in (
                ("chunk files", report.chunks),
                ("bytes", report.bytes),
                ("corrupt" if verify else "unreadable heads", len(report.corrupt)),
                ("temp files (writes in progress or crashed)", report.temp_files),
                ("quarantined files", report.quarantined),
                ("other files", report.other),
            ):
                table.add_row(label, f"{value:,}")
            console.print(table)
            for bad in report.corrupt[:20]:
                console.print(f"[red]corrupt[/red] {bad.path}: {bad.error}")
            if len(report.corrupt) > 20:
                console.print(f"... and {len(report.corrupt) - 20} more")
            raise typer.Exit(1 if report.corrupt else 0)
        if not path.exists():
            console.print(f"[red]error:[/red] {path} does not exist")
            raise typer.Exit(2)
        file = check_file(path, verify)
        table = Table(title=f"chunk file {path}", show_header=False)
        table.add_row("file bytes", f"{file.size:,}")
        if file.meta is not None:
            m = file.meta
            table.add_row("key", m.key.hex())
            table.add_row("parent", m.parent.hex())
            table.add_row("tokens", f"{m.num_tokens} ({Kind(m.kind).name.lower()}, identity {m.identity[:32].hex()})")
            table.add_row("kv spec", m.spec)
            table.add_row("codec", f"{m.codec} {m.codec_params or ''}".strip())
            table.add_row("payload bytes", f"{file.payload_len:,}")
        if file.error is not None:
            status = f"[red]{file.error}[/red]"
        else:
            status = "[green]ok[/green]" if verify else "ok (checksum not verified)"
        table.add_row("checksum" if verify else "header", status)
        console.print(table)
        raise typer.Exit(1 if file.error else 0)
