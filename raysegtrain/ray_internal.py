"""Every use of Ray's private or internal API, in one place, one section per workaround.

Each function says which Ray behaviour (as of Ray 2.60, Train V2) it relies on and what happens if Ray changes it: it
then falls back to Ray's own behaviour, never fails the run. `tests/test_ray_internal.py` holds one canary test per
workaround, against the installed Ray: it fails when the internal moves, which is the cue to revisit the workaround
here (the fallback keeps users running meanwhile).
"""

from __future__ import annotations

from typing import Any, Callable


# --------------------------------------------------------------------- Ray Train's autoscaling coordinator, early
def prestart_train_helpers() -> None:
    """Start the cluster's autoscaling-coordinator actor now, in the background. Each Ray Train controller registers
    its resource request with it (waiting up to 5 s) and creates it on first use, a process start that otherwise
    lies on the path to the first step (docs/benchmarks.md has the start-up times). It is detached: one per cluster,
    shared.

    Relies on `ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator.
    get_or_create_autoscaling_coordinator()` (Ray 2.60). If it moves or changes, this does nothing and Ray Train
    creates the coordinator itself, as it would without us: only start-up gets slower."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:
        pass


# ------------------------------------------------------------------------------ a local Ray on loopback only
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_ray_on_loopback() -> None:
    """Make the next local `ray.init` (a one-node Ray that this process starts) listen on 127.0.0.1 only.

    Why: on Linux a local Ray takes the host's outward address as its node IP, and its GCS, raylet, dashboard agent,
    runtime-env agent and workers listen on it or on all interfaces: whoever reaches the host could join the cluster
    and run code. `_node_ip_address="127.0.0.1"` does not help (ray.init turns a loopback address back into the
    outward one). Ray's own single-machine mode, the one it uses on macOS and Windows, binds everything to loopback:
    `ray._private.services.get_node_ip_address` returns 127.0.0.1 when `ray_constants.ENABLE_RAY_CLUSTER` is false,
    which the environment variable RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 sets. The constant is read when Ray is
    imported, so it is set here too; the variable is for the processes Ray starts. Relies on both (Ray 2.60); if
    they move, Ray binds as it does by default (the socket test in tests/test_run_safety.py then fails)."""
    import os

    os.environ[LOOPBACK_ENV] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except Exception:
        pass


# -------------------------------------------------------------------------- Ray Train's SIGINT handler, taken over
def take_over_sigint_handler(trainer, on_controller: Callable[[Any], None]) -> None:
    """Have TRAINER (a Ray Train V2 `DataParallelTrainer`, e.g. `TorchTrainer`) hand its controller's actor handle to
    ON_CONTROLLER instead of installing Ray's own SIGINT handler, so that the caller's handler can abort the run
    (`abort_controller`) and decide the outcome itself.

    Why: Ray Train's handler aborts the controller too, but then calls sys.exit(0) inside ray.get, which Ray's core
    worker turns into SystemExit(1) before any of our code runs (no message, MLflow run left RUNNING, exit 1); it
    ignores a second Ctrl-C and does not handle SIGTERM at all.

    Relies on Ray 2.60's `DataParallelTrainer._initialize_and_run_controller` calling
    `self._register_sigint_handler(controller)` once, in the main thread only (signal handlers must be set there),
    after creating the controller actor and before waiting for the run. If Ray renames or stops calling it,
    ON_CONTROLLER is never called: Ctrl-C gets whatever handler Ray installs instead (Ray's own behaviour), and the
    caller's handler, left with no controller to abort, must interrupt at once (KeyboardInterrupt), which ends the
    driver and with it the run's actors."""
    trainer._register_sigint_handler = on_controller


def abort_controller(controller) -> None:
    """Abort the run of Ray Train controller CONTROLLER (the handle given to `take_over_sigint_handler`'s callback):
    the controller stops the workers, keeps the checkpoints written so far, and ends, after which the trainer's
    fit() raises an error of Ray's. Relies on Ray 2.60's `TrainController.abort` actor method; ending its actor is
    the expected outcome, so RayActorError is not an error here. If the method goes, the AttributeError is raised in
    the signal handler, that is into the waiting fit(): a caller that recorded the signal reports the interruption,
    and the driver's exit ends the run's actors (without the controller's orderly stop)."""
    import ray

    try:
        ray.get(controller.abort.remote())
    except ray.exceptions.RayActorError:
        pass


# ------------------------------------------------------------- placement groups of dead Train controllers (studies)
def orphaned_placement_groups() -> list:
    """This job's placement groups whose creating actor has died: those of a trial's Train controller, killed with
    its trial when ASHA stops it. GCS keeps such a group until the job ends; Ray Train's own cleaner removes it by
    polling the state API, which lags on a small loaded machine, and meanwhile the next trial waits for CPUs that
    nothing uses (Train's 60 s worker-group start timeout then fails it). Groups made by the driver (Tune's own)
    have no creating actor and are never listed.

    Relies on Ray 2.60's GCS placement-group table, read through `ray._private.state.state.
    _connect_and_get_accessor().get_placement_group_table()` (serialized `gcs_pb2.PlacementGroupTableData`, whose
    `creator_actor_id` is nil for a driver's groups, with `creator_actor_dead`, `creator_job_id`, `is_detached` and
    the `REMOVED` state). If that moves, this finds nothing and Train's cleaner does the work alone, later."""
    import ray
    from ray.util.placement_group import PlacementGroup

    try:
        from ray._private.state import state as gcs_state
        from ray.core.generated import gcs_pb2

        job = ray.get_runtime_context().get_job_id()
        found = []
        for raw in gcs_state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            made_by_actor = not ray.ActorID(pg.creator_actor_id).is_nil()  # a driver's groups carry the nil id
            if (made_by_actor and pg.creator_actor_dead and not pg.is_detached and pg.creator_job_id.hex() == job
                    and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED):
                found.append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    except Exception:
        return []
    return found


# ---------------------------------------------------------------------------- the CPUs a local Ray will register
def ray_cpu_count() -> int | None:
    """The CPU count a local `ray.init()` registers: `ray._private.utils.get_num_cpus`, which honours container
    quotas (cgroups) that the process's CPU set does not show. None if it moved: the caller then counts the CPU set."""
    try:
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus())
    except Exception:
        return None
