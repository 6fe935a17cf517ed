"""``python -m softprompt.bench {train,infer,generate} ...``."""

import sys

from softprompt.bench import main

sys.exit(main())
