{{- define "alignd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "alignd.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "alignd.labels" -}}
{{ include "alignd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* One GPU per rank: tensor x pipeline parallel ranks in one pod. */}}
{{- define "alignd.gpus" -}}
{{- mul (int .Values.parallelism.tensor) (int .Values.parallelism.pipeline) -}}
{{- end -}}

{{- define "alignd.secretName" -}}
{{- .Values.apiKey.existingSecret | default (include "alignd.fullname" .) -}}
{{- end -}}

{{/* SIGKILL must come after the preStop pause and the server's drain. */}}
{{- define "alignd.grace" -}}
{{- $least := add (int .Values.shutdownTimeoutSeconds) (int .Values.preStopSleepSeconds) -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $least 25 -}}
{{- else if le (int .Values.terminationGracePeriodSeconds) $least -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed shutdownTimeoutSeconds + preStopSleepSeconds (%v)" .Values.terminationGracePeriodSeconds $least) -}}
{{- else -}}
{{- int .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* Every hub id the server loads, for the prefetch step: not py: rewards, not paths. */}}
{{- define "alignd.repos" -}}
{{- $specs := concat (list .Values.model .Values.reference .Values.baseline) (values .Values.rewards) (values .Values.valueModels) -}}
{{- $repos := list -}}
{{- range $specs }}
{{- if and . (not (hasPrefix "py:" .)) (not (hasPrefix "/" .)) (not (hasPrefix "." .)) }}{{ $repos = append $repos . }}{{ end }}
{{- end -}}
{{- $repos | uniq | toJson -}}
{{- end -}}
