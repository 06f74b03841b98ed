# Reference values from R pROC for tests/test_classification.py.
#
# Usage:
#   Rscript tests/r/proc_reference.R export-asah OUT.csv
#       Writes pROC's aSAH data set as CSV: truth (1 = outcome "Poor", 0 = "Good"), s100b, ndka.
#   Rscript tests/r/proc_reference.R reference IN.csv [CONF_LEVEL]
#       IN.csv has columns truth (0/1), score1 and optionally score2. Prints one JSON object:
#       auc1, ci1 (low, high), and with score2 also auc2, ci2, difference, difference_ci, z, p
#       from roc.test(paired = TRUE, method = "delong"). Controls are truth 0, cases truth 1,
#       direction "<" (larger score = case), so no automatic direction choice is involved.
#
# jsonlite is used when installed (digits = NA: 15 significant digits); otherwise, or with the
# environment variable PROC_REFERENCE_NO_JSONLITE=1, the same JSON is written with
# cat(sprintf("%.17g")).

suppressPackageStartupMessages(library(pROC))

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 2) {
  stop("usage: proc_reference.R export-asah OUT.csv | reference IN.csv [CONF_LEVEL]")
}

num <- function(x) {
  if (is.character(x)) return(sprintf("\"%s\"", x))
  if (length(x) != 1 || is.na(x)) return("null")
  if (is.infinite(x)) return("null")
  sprintf("%.17g", x)
}

emit <- function(values) {
  # values: named list of numeric vectors (length 1 or 2) and character scalars
  if (Sys.getenv("PROC_REFERENCE_NO_JSONLITE") != "1" && requireNamespace("jsonlite", quietly = TRUE)) {
    cat(jsonlite::toJSON(values, auto_unbox = TRUE, digits = NA, na = "null"), "\n", sep = "")
  } else {
    parts <- vapply(names(values), function(key) {
      v <- values[[key]]
      text <- if (length(v) == 1) num(v) else paste0("[", paste(vapply(as.list(v), num, ""), collapse = ", "), "]")
      sprintf("\"%s\": %s", key, text)
    }, "")
    cat("{", paste(parts, collapse = ", "), "}\n", sep = "")
  }
}

mode <- args[[1]]
if (mode == "export-asah") {
  data(aSAH, package = "pROC", envir = environment())
  out <- data.frame(
    truth = as.integer(aSAH$outcome == "Poor"),
    s100b = aSAH$s100b,
    ndka = aSAH$ndka
  )
  write.csv(out, args[[2]], row.names = FALSE)
} else if (mode == "reference") {
  conf.level <- if (length(args) >= 3) as.numeric(args[[3]]) else 0.95
  d <- read.csv(args[[2]])
  fit <- function(score) {
    roc(response = d$truth, predictor = score, levels = c(0, 1), direction = "<", quiet = TRUE)
  }
  r1 <- fit(d$score1)
  ci1 <- ci.auc(r1, method = "delong", conf.level = conf.level)
  values <- list(
    version = as.character(packageVersion("pROC")),
    n_cases = length(r1$cases),
    n_controls = length(r1$controls),
    auc1 = as.numeric(auc(r1)),
    ci1 = c(ci1[1], ci1[3])
  )
  if ("score2" %in% names(d)) {
    r2 <- fit(d$score2)
    ci2 <- ci.auc(r2, method = "delong", conf.level = conf.level)
    test <- roc.test(r1, r2, method = "delong", paired = TRUE, conf.level = conf.level)
    values$auc2 <- as.numeric(auc(r2))
    values$ci2 <- c(ci2[1], ci2[3])
    values$difference <- as.numeric(test$estimate[1] - test$estimate[2])
    values$difference_ci <- as.numeric(test$conf.int)
    values$z <- as.numeric(test$statistic)
    values$p <- as.numeric(test$p.value)
  }
  emit(values)
} else {
  stop(paste("unknown mode:", mode))
}
