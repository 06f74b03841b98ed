# lmerTest reference (Satterthwaite df) for tests/test_satterthwaite.py and perf/bench_coverage_satterthwaite.py.
#
#   Rscript tests/r/lmertest_reference.R IN.csv FORMULA REML [CONTRAST]
#
# FORMULA is a full lme4 formula; REML is TRUE or FALSE; CONTRAST (optional) is a comma-separated
# weight per fixed effect, tested with lmerTest::contest1D (Satterthwaite).
# Output: one tab-separated line per number:  KEY  NAME  VALUE
#   KEY  estimate, se, df, t, p (NAME = lme4 coefficient name), contrast_* (NAME = L), var (NAME = group),
#        converged
suppressPackageStartupMessages(library(lmerTest))

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 3) stop("usage: lmertest_reference.R IN.csv FORMULA REML [CONTRAST]")
num <- function(x) sprintf("%.17g", x)
emit <- function(key, name, value) cat(key, "\t", name, "\t", value, "\n", sep = "")

data <- read.csv(args[1], stringsAsFactors = TRUE)
reml <- switch(toupper(args[3]), "TRUE" = TRUE, "FALSE" = FALSE, stop("REML must be TRUE or FALSE"))
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5))
fit <- lmer(as.formula(args[2]), data = data, REML = reml, control = ctrl)
coefs <- summary(fit, ddf = "Satterthwaite")$coefficients
for (i in seq_len(nrow(coefs))) {
  name <- rownames(coefs)[i]
  emit("estimate", name, num(coefs[i, "Estimate"]))
  emit("se", name, num(coefs[i, "Std. Error"]))
  emit("df", name, num(coefs[i, "df"]))
  emit("t", name, num(coefs[i, "t value"]))
  emit("p", name, num(coefs[i, "Pr(>|t|)"]))
}
vcs <- as.data.frame(VarCorr(fit))
for (i in seq_len(nrow(vcs))) emit("var", vcs$grp[i], num(vcs$vcov[i]))
messages <- fit@optinfo$conv$lme4$messages
emit("converged", "lme4", if (is.null(messages)) "TRUE" else "FALSE")
if (length(args) >= 4) {
  L <- as.numeric(strsplit(args[4], ",")[[1]])
  ct <- contest1D(fit, L, ddf = "Satterthwaite")
  emit("contrast_estimate", "L", num(ct$Estimate))
  emit("contrast_se", "L", num(ct[["Std. Error"]]))
  emit("contrast_df", "L", num(ct$df))
  emit("contrast_p", "L", num(ct[["Pr(>|t|)"]]))
}
