"""daemonctl's text rendering: status, the agents table, one agent in detail, verify's and
rebuild-index's reports, agents not durable. Pure functions of the daemon's and the
store's replies."""

from __future__ import annotations

import time
from pathlib import Path


def _unsaved_text(unsaved: list[dict]) -> str:
    lines = [f"{len(unsaved)} agent(s) not durable: their latest turns are not on disk"]
    lines += [
        f"  {r.get('agent_id')}: {r.get('behind_tokens')} token(s) behind ({r.get('error')})"
        for r in unsaved
    ]
    return "\n".join(lines)


def _status_text(s: dict) -> str:
    pool = s.get("pool", {})
    store = s.get("store", {})
    return (
        f"agentkv daemon running (pid {s.get('pid')}) on {s.get('socket')}\n"
        f"  model {s.get('model')} ({s.get('model_type')}), fingerprint {s.get('fingerprint')}\n"
        f"  uptime {s.get('uptime_s', 0):.0f} s, {s.get('agents', 0)} agents, "
        f"{s.get('active', 0)} running, {s.get('waiting', 0)} waiting\n"
        f"  pool {pool.get('in_use', 0)}/{pool.get('total', 0)} blocks in use, "
        f"{pool.get('cached', 0)} cached\n"
        f"  store {store.get('blocks', 0)} blocks, {store.get('block_bytes', 0) / 2**20:.1f} MiB; "
        f"restored {s.get('restored_agents', 0)} agents / {s.get('restored_tokens', 0)} tokens"
        + _durability_text(s)
        + _index_error_line(store)
        + _ranks_text(s)
        + (f"\n  http {s['http']}" if s.get("http") else "")
    )


def _ranks_text(s: dict) -> str:
    """A distributed daemon's world size and each rank's pool and store use."""
    dist = s.get("distributed")
    if not dist:
        return ""
    lines = [f"\n  world size {dist.get('world_size')}"]
    for r in dist.get("ranks", []):
        lines.append(
            f"\n    rank {r['rank']}: pool {r['pool_in_use']}/{r['pool_total']} blocks in use, "
            f"store {r['store_blocks']} blocks, {r['store_bytes'] / 2**20:.1f} MiB"
        )
    return "".join(lines)


def _durability_text(s: dict) -> str:
    """Write errors and agents whose latest turns are not on disk, if any."""
    errors = s.get("store", {}).get("write_errors", 0)
    unsaved = s.get("unsaved") or []
    if not errors and not unsaved:
        return ""
    text = f"\n  store write errors: {errors}"
    return text + ("\n  " + _unsaved_text(unsaved).replace("\n", "\n  ") if unsaved else "")


def _table(rows: list[dict]) -> str:
    head = (
        f"{'agent':<24}{'tokens':>8}{'cached':>8}{'blocks':>8}{'shared':>8}{'on disk':>8}"
        f"  {'last used':<19}  state"
    )
    lines = [head]
    for r in rows:
        state = r.get("state") or _old_state(r)
        lines.append(
            f"{r['agent_id']:<24}{r['tokens']:>8}{r['cached_tokens']:>8}"
            f"{r['blocks']:>8}{r['shared_blocks']:>8}{r.get('disk_blocks', 0):>8}"
            f"  {_when(r.get('last_used')):<19}  {state}"
        )
    return "\n".join(lines)


def _old_state(row: dict) -> str:
    """The state column for a daemon that does not report `state`."""
    if row.get("busy"):
        return "running"
    if row.get("cached_tokens"):
        return "in memory"
    return "on disk" if row.get("in_store") else "no cache"


_LABELS = {"disk_blocks": "blocks on disk", "last_used": "last used"}


def _detail(row: dict) -> str:
    lines = []
    for k, v in row.items():
        if k in ("token_ids", "token_offset"):
            continue
        lines.append(f"{_LABELS.get(k, k):>14}: {_when(v) if k == 'last_used' else v}")
    return "\n".join(lines)


def _when(ts) -> str:
    """A wall-clock time as local date and time; "-" for never."""
    if not isinstance(ts, (int, float)) or ts <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _index_error_line(store_stats: dict) -> str:
    """The status text's line for an index the daemon cannot read ("" when it can)."""
    error = store_stats.get("index_error")
    return f"\n  index damaged: {error}" if error else ""


def _verify_data(report) -> dict:
    return {
        "checked": report.checked,
        "bytes": report.bytes_checked,
        "corrupt": report.corrupt,
        "index_error": report.index_error,
        "affected_agents": report.affected_agents,
    }


def _index_damage_line(store: Path, report) -> str:
    """verify's one line for an index that is gone or damaged, with the way out."""
    agents = report.affected_agents
    affected = (
        f"{len(agents)} agent(s) affected: {', '.join(agents[:10])}"
        + (", ..." if len(agents) > 10 else "")
        if agents
        else "no agent's rows found unreadable"
    )
    return (
        f"index damaged: {report.index_error}; {affected}; "
        f"rebuild it from the files: daemonctl rebuild-index --store {store}"
    )


def _rebuild_text(r) -> str:
    verb = "would rebuild" if r.dry_run else "rebuilt"
    lines = [
        f"{verb} the index: {len(r.agents)} agents ({r.restored_tokens} tokens), "
        f"{r.blocks} blocks, {len(r.models)} model(s)"
    ]
    if r.old_index:
        lines.append(f"old index kept as {r.old_index}")
    for title, items in (
        ("agents with less cache (recomputed on use)", r.cut_agents),
        ("agents lost (their context cannot be recovered)", r.lost_agents),
        ("files left aside (bad or not the store's; gc removes them)", r.bad_files),
    ):
        if items:
            lines.append(f"{title}: {len(items)}")
            lines += [f"  {item}" for item in items]
    return "\n".join(lines)
