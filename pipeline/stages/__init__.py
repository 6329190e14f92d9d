"""Stage modules: one per DVC stage and Prefect task (``run(cfg)``). A stage composes the library
(``pipeline.*``) and never imports another stage (tests/test_architecture.py keeps it so)."""
