{{/* Names and labels shared by every object of the chart. */}}

{{- define "room-classifier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name: the release name alone when it already contains the chart's name. */}}
{{- define "room-classifier.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "room-classifier.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "room-classifier.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The labels that pick this release's pods: Service, PDB and Deployment selectors use exactly these. */}}
{{- define "room-classifier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "room-classifier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "room-classifier.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "room-classifier.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Longest a pod may take to stop: the preStop pause, the longest request (the service answers 504 at
     requestTimeoutSeconds, BentoML's own backstop is 5 s later) and a margin. */}}
{{- define "room-classifier.terminationGracePeriodSeconds" -}}
{{- add .Values.shutdown.preStopSleepSeconds .Values.requestTimeoutSeconds 5 .Values.shutdown.marginSeconds }}
{{- end }}
