"""Run under `accelerate launch --multi_gpu --num_processes 2`: train the config at argv[1]; each rank writes to
argv[2].<rank> its own count of skipped samples when the run last summed them (the final step's log and save)."""
import json
import sys

from vlp.config import load_config
from vlp.train import Trainer


class Recording(Trainer):
    def bad_samples(self):
        self.local_bad = dict(getattr(self, "_bad", {}))
        return super().bad_samples()


trainer = Recording(load_config(sys.argv[1]))
trainer.fit()
json.dump({"local": trainer.local_bad, "logged": trainer.last_metrics.get("bad_samples/junk")},
          open(f"{sys.argv[2]}.{trainer.rank}", "w"))
