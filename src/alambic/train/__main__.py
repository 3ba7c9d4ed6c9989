"""`python -m alambic.train --config FILE.toml`: the trainer without the CLI (for `accelerate launch -m`)."""

from .trainer import main

raise SystemExit(main())
