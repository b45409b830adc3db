"""Overrides that shorten a recipe to a 2-step smoke run (shared by the recipe tests)."""

SHORT = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--trainer.num_sanity_val_steps=0"]
SHORT_SYNTHETIC = ["--data.init_args.batch_size=4", "--data.init_args.num_val=4", "--data.init_args.num_train=64"]
