"""Canaries for `raysegtrain.ray_internal`: one per workaround, each checking the Ray internal it relies on against the
installed Ray. A failure here means Ray changed under a workaround: the workaround falls back to Ray's own behaviour
(see its docstring), and should be revisited."""

from __future__ import annotations

import importlib
import inspect
import time

import pytest

# ------------------------------------------------------------------ prestart_train_helpers: autoscaling coordinator
COORDINATOR_MODULE = "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator"


def test_the_autoscaling_coordinator_factory_is_where_we_call_it_and_takes_no_arguments():
    module = importlib.import_module(COORDINATOR_MODULE)
    factory = module.get_or_create_autoscaling_coordinator
    assert all(p.default is not p.empty for p in inspect.signature(factory).parameters.values())


def test_ray_train_gets_its_coordinator_from_the_same_factory():
    # otherwise starting that actor ahead no longer takes anything off Ray Train's path to the first step
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

    assert f"from {COORDINATOR_MODULE} import" in inspect.getsource(client)
    assert "get_or_create_autoscaling_coordinator()" in inspect.getsource(client)


def test_ray_trains_autoscaling_coordinator_is_started_ahead(ray_local):
    # Ray-internal: if Ray moves it, prestart_train_helpers silently does nothing, and this test says so
    import ray

    from raysegtrain.ray_internal import prestart_train_helpers

    name = dict(name="AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    try:  # an earlier fit's controller may have made it: remove it, so that only the prestart can bring it back
        old = ray.get_actor(**name)
    except ValueError:
        old = None
    if old is not None:
        ray.kill(old, no_restart=True)  # asynchronous: the name is free once the GCS has recorded the death
        deadline = time.monotonic() + 60
        while _named_actor_exists(name) and time.monotonic() < deadline:
            time.sleep(0.2)  # polls the GCS for the state change; the deadline bounds it
        assert not _named_actor_exists(name), "the killed coordinator still holds its name after 60 s"
    prestart_train_helpers()
    new = ray.get_actor(**name)
    assert ray.get(new.__ray_ready__.remote()) is True
    assert old is None or new._actor_id != old._actor_id  # made by the prestart, not the earlier one


def _named_actor_exists(name: dict) -> bool:
    import ray

    try:
        ray.get_actor(**name)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------ take_over_sigint_handler, abort_controller: Ctrl-C
def test_torch_trainer_hands_its_controller_to_register_sigint_handler_in_the_main_thread():
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert issubclass(TorchTrainer, DataParallelTrainer)
    assert TorchTrainer.fit is DataParallelTrainer.fit
    assert "self._initialize_and_run_controller(" in inspect.getsource(DataParallelTrainer.fit)
    run = DataParallelTrainer._initialize_and_run_controller
    assert TorchTrainer._initialize_and_run_controller is run
    source = inspect.getsource(run)
    assert "self._register_sigint_handler(controller)" in source
    assert "threading.main_thread()" in source
    # the handler is registered before the run is waited for, so a signal during the run finds the controller
    assert source.index("self._register_sigint_handler(controller)") < source.index("ray.get(controller.run.remote())")
    assert list(inspect.signature(TorchTrainer._register_sigint_handler).parameters) == ["self", "controller"]


def test_the_instance_override_replaces_ray_trains_handler():
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysegtrain.ray_internal import take_over_sigint_handler

    trainer = TorchTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    handed = []
    take_over_sigint_handler(trainer, handed.append)
    trainer._register_sigint_handler("controller")  # what _initialize_and_run_controller calls
    assert handed == ["controller"]


def test_the_controller_actor_is_a_train_controller_with_an_abort_method():
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    assert "(TrainController)" in inspect.getsource(DataParallelTrainer._initialize_and_run_controller)
    # the code object, not inspect.signature: once any TrainController actor was made in this process, Ray's
    # tracing injection has set a __signature__ with an extra _ray_trace_ctx on the same function object
    code = TrainController.abort.__code__
    assert code.co_varnames[:code.co_argcount + code.co_kwonlyargcount] == ("self",)


# ------------------------------------------------- orphaned_placement_groups: GCS's placement-group table (studies)
def test_placement_group_rows_have_the_fields_and_states_we_filter_on():
    from ray.core.generated import gcs_pb2

    row = gcs_pb2.PlacementGroupTableData
    fields = row.DESCRIPTOR.fields_by_name
    assert {"placement_group_id", "creator_actor_id", "creator_actor_dead", "creator_job_id", "is_detached",
            "state"} <= set(fields)
    assert fields["creator_actor_dead"].type == fields["creator_actor_dead"].TYPE_BOOL
    assert fields["is_detached"].type == fields["is_detached"].TYPE_BOOL
    states = row.DESCRIPTOR.enum_types_by_name["PlacementGroupState"].values_by_name
    assert row.REMOVED == states["REMOVED"].number and row.CREATED == states["CREATED"].number


def test_gcs_placement_group_table_reads_as_orphaned_placement_groups_parses_it(ray_local):
    """The raw table, read as the workaround reads it (which swallows any error, so only this shows a break): a
    driver's group has the nil creator actor, an actor's group names its actor and is marked once that actor dies,
    both carry this job's id, and a removed group stays listed as REMOVED."""
    import time

    import ray
    from ray._private.state import state as gcs_state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

    table = gcs_pb2.PlacementGroupTableData

    def row(pg):
        rows = [table.FromString(raw) for raw in gcs_state._connect_and_get_accessor().get_placement_group_table()]
        (found,) = [r for r in rows if r.placement_group_id == pg.id.binary()]
        return found

    @ray.remote(num_cpus=0)
    class Creator:
        def reserve(self):
            pg = placement_group([{"CPU": 0.25}])
            ray.get(pg.ready())
            return pg.id.hex()

    job = ray.get_runtime_context().get_job_id()
    drivers = placement_group([{"CPU": 0.25}])
    ray.get(drivers.ready())
    creator = Creator.remote()
    actors = PlacementGroup(ray.PlacementGroupID.from_hex(ray.get(creator.reserve.remote())))
    try:
        mine = row(drivers)
        # (its creator_actor_dead reads true, no actor being alive: the nil id is what tells the driver's apart)
        assert ray.ActorID(mine.creator_actor_id).is_nil()
        assert mine.creator_job_id.hex() == job and not mine.is_detached and mine.state == table.CREATED
        assert PlacementGroup(ray.PlacementGroupID(mine.placement_group_id)).id == drivers.id

        theirs = row(actors)
        assert not ray.ActorID(theirs.creator_actor_id).is_nil() and not theirs.creator_actor_dead
        assert theirs.creator_job_id.hex() == job and not theirs.is_detached
        ray.kill(creator)
        deadline = time.monotonic() + 60
        while not row(actors).creator_actor_dead and time.monotonic() < deadline:  # GCS learns of the death
            time.sleep(0.05)
        assert row(actors).creator_actor_dead and row(actors).state == table.CREATED  # kept until the job ends

        remove_placement_group(actors)
        deadline = time.monotonic() + 60
        while row(actors).state != table.REMOVED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert row(actors).state == table.REMOVED
    finally:
        ray.kill(creator)
        for pg in (drivers, actors):
            try:
                remove_placement_group(pg)
            except Exception:  # removed above
                pass


def test_ray_still_counts_a_local_nodes_cpus_where_we_ask():
    import os

    from raysegtrain.ray_internal import ray_cpu_count

    count = ray_cpu_count()
    assert count is not None and 1 <= count <= os.cpu_count()


def test_a_local_node_takes_the_loopback_address_when_ray_clusters_are_off():
    """ray_internal.local_ray_on_loopback: the switch and the variable are where it sets them, and the node address
    still comes from the switch (the socket test in test_run_safety.py checks the outcome)."""
    from ray._private import ray_constants, services

    from raysegtrain import ray_internal

    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == ray_internal.LOOPBACK_ENV
    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    source = inspect.getsource(services.get_node_ip_address)
    assert "ray_constants.ENABLE_RAY_CLUSTER" in source and "get_localhost_ip()" in source
