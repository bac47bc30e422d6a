"""The Ablations tab: one pair under mask on / off, step ranges and thresholds."""
from __future__ import annotations

from ..session import Session, UserError

class AblationService:
    def ablation_pair(self, session: Session):
        """The fused pair the ablation varies; UserError when there is none or other weights fused it."""
        r = session.result
        if r is None:
            raise UserError("fuse a pair first: the ablation varies the current pair")
        if r.model_id != self.weights_id(session):
            raise UserError("the current pair was fused with other weights than this session's now: fuse it again")
        return r

    def ablation(self, session: Session, thresholds=(0.2, 0.4, 0.6)):
        from dfusion_core.pairs.ablation import run_ablation

        r = self.ablation_pair(session)
        return self._run(session, run_ablation, self.model, r.prompt, r.base_seed, r.ref_seed, r.sampling,
                         r.fusion, cache=self.cache, base=r.base, base_image=r.base_image,
                         scorer=self.scorer, thresholds=[(f"relative {t}", t) for t in thresholds])
