"""Planning stage: ``plan(report, recipe, statistics) -> QuantPlan``."""

from builder.plan.artifact import ActivationEdge, NodePlan, QuantPlan, WeightEdge, load_plan
from builder.plan.flops import gemm_flops
from builder.plan.planner import plan

__all__ = ["ActivationEdge", "NodePlan", "QuantPlan", "WeightEdge", "gemm_flops", "load_plan", "plan"]
