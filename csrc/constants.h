// The codes that cross the op boundary as plain ints: lrp_backward's `rule` and
// attention_backward's `mode`. Defined here only; Python reads the name -> code tables from the
// extension (_C.rule_codes(), _C.attention_modes()), so the two sides cannot drift apart.
#pragma once

namespace lxt_ext {

enum Rule : int { kGradient = 0, kEpsilon = 1, kGamma = 2, kAlphaBeta = 3 };

enum AttentionMode : int { kAttnLRP = 0, kCP = 1 };

template <typename Code>
struct Named {
  const char* name;
  Code code;
};

// The keys are Python's (lxt_ext.ops.RULES, lxt_ext.ops.ATTENTION_MODES).
inline constexpr Named<Rule> kRuleNames[] = {
    {"gradient", kGradient}, {"epsilon", kEpsilon}, {"gamma", kGamma}, {"alpha_beta", kAlphaBeta}};
inline constexpr Named<AttentionMode> kAttentionModeNames[] = {{"attnlrp", kAttnLRP}, {"cp", kCP}};

}  // namespace lxt_ext
