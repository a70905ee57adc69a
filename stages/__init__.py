"""Built-in stages. Each module builds one StageSpec and registers it with the public register_stage()."""
