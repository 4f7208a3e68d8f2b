"""The experiment application built on the library: tasks and data (:mod:`~subpeft.app.data`), models by name
(:mod:`~subpeft.app.models`), workloads per kind of task (:mod:`~subpeft.app.workloads`), run specs and runs
(:mod:`~subpeft.app.run`: ``subpeft train`` / ``eval``), comparisons (:mod:`~subpeft.app.compare`). It trains
with the library's loop (:mod:`subpeft.training`); the library never imports it."""
