# lme4 reference fits for tests/test_lmm.py and perf/bench_mixed.py.
#
#   Rscript tests/r/lme4_reference.R IN.csv FORMULA REML [profile] [ranef]
#   Rscript tests/r/lme4_reference.R --export-sleepstudy OUT.csv
#
# FORMULA is a full lme4 formula, e.g. "y ~ age + factor(vendor) + (1 | site) + (1 | site:scanner)".
# REML is TRUE, FALSE or BOTH. "profile" adds confint(method = "profile") on the SD scale,
# "ranef" the conditional modes (BLUPs).
#
# Output: one tab-separated line per number:  FIT  KEY  NAME  VALUE
#   FIT    reml or ml
#   KEY    fixef, se, var (NAME = lme4 group or Residual), loglik, fit_seconds (system.time
#          around lmer only), converged, theta, ci_low / ci_high (NAME = confint row), ranef
#          (NAME = group|level)
suppressPackageStartupMessages(library(lme4))

args <- commandArgs(trailingOnly = TRUE)
num <- function(x) sprintf("%.17g", x)
emit <- function(fit, key, name, value) cat(fit, "\t", key, "\t", name, "\t", value, "\n", sep = "")

if (length(args) >= 1 && args[1] == "--export-sleepstudy") {
  if (length(args) < 2) stop("usage: lme4_reference.R --export-sleepstudy OUT.csv")
  write.csv(lme4::sleepstudy, args[2], row.names = FALSE)
  quit(status = 0)
}
if (length(args) < 3) stop("usage: lme4_reference.R IN.csv FORMULA REML [profile] [ranef]")

data <- read.csv(args[1], stringsAsFactors = TRUE)
form <- as.formula(args[2])
which <- toupper(args[3])
extras <- tolower(args[-(1:3)])
fits <- switch(which, "TRUE" = TRUE, "FALSE" = FALSE, "BOTH" = c(TRUE, FALSE),
               stop("REML must be TRUE, FALSE or BOTH"))

for (reml in fits) {
  tag <- if (reml) "reml" else "ml"
  timing <- system.time(fit <- lmer(form, data = data, REML = reml))
  emit(tag, "fit_seconds", "lmer", num(timing[["elapsed"]]))
  beta <- fixef(fit)
  se <- sqrt(diag(as.matrix(vcov(fit))))
  for (i in seq_along(beta)) {
    emit(tag, "fixef", names(beta)[i], num(beta[[i]]))
    emit(tag, "se", names(beta)[i], num(se[[i]]))
  }
  vcs <- as.data.frame(VarCorr(fit))
  for (i in seq_len(nrow(vcs))) emit(tag, "var", vcs$grp[i], num(vcs$vcov[i]))
  emit(tag, "loglik", "logLik", num(as.numeric(logLik(fit))))
  theta <- getME(fit, "theta")
  for (i in seq_along(theta)) emit(tag, "theta", names(theta)[i], num(theta[[i]]))
  messages <- fit@optinfo$conv$lme4$messages
  emit(tag, "converged", "lme4", if (is.null(messages)) "TRUE" else "FALSE")
  if ("ranef" %in% extras) {
    re <- ranef(fit)
    for (grp in names(re)) {
      values <- re[[grp]][, 1]
      levels <- rownames(re[[grp]])
      for (j in seq_along(values)) emit(tag, "ranef", paste0(grp, "|", levels[j]), num(values[j]))
    }
  }
  if ("profile" %in% extras) {
    ci <- suppressWarnings(confint(fit, parm = "theta_", method = "profile", oldNames = FALSE))
    for (i in seq_len(nrow(ci))) {
      emit(tag, "ci_low", rownames(ci)[i], num(ci[i, 1]))
      emit(tag, "ci_high", rownames(ci)[i], num(ci[i, 2]))
    }
  }
}
