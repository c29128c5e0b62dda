"""One task at a data site: check the run's app, then run fedml's installed ClientApp.

`fedml client` runs its SuperNode with `--isolation process`, so the SuperNode starts
no app code itself; fedml's site executor (fedml.deploy.site_executor) takes each task
from the SuperNode's local Runtime API and runs `run_task` in a fresh process for it, a
fork of its warm self (one process per message, as Flower's `flwr-clientapp` does; `python
-m fedml.deploy.site_task` runs one task in a process of its own). This replaces
`flwr-clientapp`, which would install the run's app bundle and import the ClientApp
named in it. Here:

1. the task's message, context, run and app bundle are pulled from the SuperNode
   (Flower's own Runtime API client and helpers, fedml.deploy.flower_runtime);
2. the bundle, the run config and the message are checked (fedml.deploy.app_check)
   before anything of them is imported; the bundle is never unpacked or installed;
3. the task is judged by the site's policy and privacy ledger (fedml.deploy.policy_check),
   still before any data is read;
4. a refused task gets an error reply saying why, with code `APP_REFUSED_CODE` (the
   app) or `POLICY_REFUSED_CODE` (the policy: the rule is named), which the site logs
   too, and the site goes on serving; an accepted one runs `clients.app:app`, imported
   from the fedml installed at the site;
5. the task is written into the site's audit trail (fedml.deploy.site_audit), with the
   epsilon it spent, and the reply and the task's status go back to the SuperNode.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import nullcontext

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from fedml.deploy import flower_runtime as runtime
from fedml.deploy.app_check import (
    ALLOWED_MODELS_KEY,
    config_refusal,
    fab_refusal,
    message_refusal,
)
from fedml.deploy.policy_check import judged
from fedml.deploy.site_audit import record_task
from fedml.deploy.site_state import TASK_DONE_MARK, TASK_FAILED_MARK, TASK_REFUSED_MARK
from fedml.failures import DECLINED_CODE, POLICY_REFUSED_CODE, without_paths
from fedml.node_state import SITE_NAME_KEY

APP_REFUSED_CODE = ErrorCode.INVALID_FAB  # error reply: the site refused the run's app
APP_FAILED_CODE = ErrorCode.CLIENT_APP_RAISED_EXCEPTION  # error reply: the ClientApp raised

log = logging.getLogger("fedml.site")


def refusal(message: Message, run_config: dict, node_config: dict, fab: bytes) -> str | None:
    """Why this site does not run this task, or None."""
    allowed = [m for m in str(node_config.get(ALLOWED_MODELS_KEY, "")).split(",") if m]
    return (
        fab_refusal(fab)
        or config_refusal(run_config, allowed)
        or message_refusal(list(message.content.keys()) if message.has_content() else [])
    )


def run_task(runtime_api_address: str, token: str, parent_pid: int | None) -> int:
    """Serve one task; the process's exit code (0: a reply was sent)."""
    if parent_pid is not None:
        runtime.exit_with_parent(parent_pid)
    client = runtime.connect(runtime_api_address, token)
    heartbeat = runtime.start_heartbeat(client)
    context, reply, status, details = None, None, runtime.FAILED, "the task did not start"
    message = run = None
    try:
        message, context, run, fab = runtime.pull_task_input(client)
        why = refusal(message, dict(context.run_config), dict(context.node_config), fab.content)
        code, spent = APP_REFUSED_CODE, None
        with judged(message, context) if why is None else nullcontext() as judgement:
            if judgement is not None:
                why, code = judgement.refusal, POLICY_REFUSED_CODE
            if why is not None:
                details = f"fedml site refused run {run.run_id} ({run.fab_id}): {why}"
                reply = Message(Error(code=code, reason=details), reply_to=message)
            else:
                reply = _run_clientapp(message, context)
                status, details = runtime.COMPLETED, ""
                spent = judgement.spent() if judgement is not None else None
        reply = _say_outcome(message, reply, str(context.node_config.get(SITE_NAME_KEY, "")))
        outcome = _outcome(reply, refused=why is not None)
        record_task(message, context, run, reply, *outcome, privacy=spent)
    except Exception as exc:  # whatever happens, the SuperNode hears of it
        log.exception("the task failed")
        details = f"{type(exc).__name__}: {exc}"
        log.error("%s%s", TASK_FAILED_MARK, without_paths(details))
        if message is not None and context is not None:  # the trail keeps every task
            record_task(message, context, run, None, "failed", without_paths(details))
    finally:
        try:
            if reply is not None and context is not None:
                runtime.push_reply(client, reply, context)
        except Exception:  # the SuperNode went away meanwhile: say so, end cleanly
            log.exception("could not hand the reply to the SuperNode")
            reply = None
        runtime.push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()
    return 0 if reply is not None else 1


def _outcome(reply: Message, refused: bool) -> tuple[str, str]:
    """(what became of the task, why) for the site's audit trail."""
    if not reply.has_error():
        return "done", ""
    why = reply.error.reason or f"error code {reply.error.code}"
    if refused:
        return "refused", why
    return ("declined" if reply.error.code == DECLINED_CODE else "failed"), why


def _say_outcome(message: Message, reply: Message, site: str) -> Message:
    """Log the task's outcome on one marked line (the site's console repeats failures)
    and, for a failure, make the reply's reason safe to send: local paths removed, the
    site's name in front, so the server can say which site failed and why."""
    kind = message.metadata.message_type
    if not reply.has_error() or reply.error.code == DECLINED_CODE:  # a decline is no fault
        log.info("%s%s", TASK_DONE_MARK, kind)
        return reply
    reason = without_paths(reply.error.reason or f"error code {reply.error.code}")
    if site:
        reason = f"site {site}: {reason}"
    refused = reply.error.code in (APP_REFUSED_CODE, POLICY_REFUSED_CODE)
    log.error("%s%s: %s", TASK_REFUSED_MARK if refused else TASK_FAILED_MARK, kind, reason)
    return Message(Error(code=reply.error.code, reason=reason), reply_to=message)


def _run_clientapp(message: Message, context: Context) -> Message:
    """fedml's ClientApp, as installed at this site; its failure is an error reply.
    Imported here, after the app check passed: a task run on its own loads PyTorch only
    for a run the site accepts (the site executor has imported it already)."""
    from clients.app import app

    try:
        return app(message=message, context=context)
    except Exception as exc:  # reported to the server, as Flower does
        log.exception("fedml's ClientApp raised")
        reason = f"{type(exc).__name__}: {exc}"
        return Message(Error(code=APP_FAILED_CODE, reason=reason), reply_to=message)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one fedml task at a data site.")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    token = sys.stdin.readline().strip()  # from the site executor, never on argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    raise SystemExit(run_task(args.runtime_api_address, token, args.parent_pid))


if __name__ == "__main__":
    main()
