{{/* Names, labels and the shared pieces of the broker Deployments. */}}

{{- define "strata.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "strata.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "strata.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "strata.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Every broker pod carries these; Services, the PodDisruptionBudget and the
     ServiceMonitor's Service select by them. */}}
{{- define "strata.selectorLabels" -}}
app.kubernetes.io/name: {{ include "strata.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end -}}

{{- define "strata.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "strata.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "strata.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "strata.metadataSecretName" -}}
{{- if .Values.metadata.existingSecret -}}
{{- .Values.metadata.existingSecret -}}
{{- else -}}
{{- printf "%s-metadata" (include "strata.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Fails rendering early with what to set. */}}
{{- define "strata.validate" -}}
{{- if not .Values.objectStore.url -}}
{{- fail "objectStore.url is required: the object store every broker shares, e.g. s3://my-bucket/strata" -}}
{{- end -}}
{{- if not (or .Values.metadata.url .Values.metadata.existingSecret) -}}
{{- fail "metadata.url (postgres://USER:PASSWORD@HOST:5432/DB) or metadata.existingSecret is required: the metadata store every broker shares" -}}
{{- end -}}
{{- if and .Values.metadata.url .Values.metadata.existingSecret -}}
{{- fail "set metadata.url or metadata.existingSecret, not both" -}}
{{- end -}}
{{- range $key, $_ := .Values.config -}}
{{- if has $key (list "listen" "advertise" "http" "data-dir" "zone" "object-store" "metadata") -}}
{{- fail (printf "config.%s is set by the chart itself; see values.yaml for the value that controls it" $key) -}}
{{- end -}}
{{- if and (eq $key "broker-id") $.Values.brokerIdFromPodIP -}}
{{- fail "config.broker-id conflicts with brokerIdFromPodIP=true: set one of them" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The broker Deployments: one with no zone, or one per zone in .Values.zones.
     Each entry is a dict: name (Deployment name), zone (or ""). */}}
{{- define "strata.deployments" -}}
{{- $fullname := include "strata.fullname" . -}}
{{- $out := list -}}
{{- if .Values.zones -}}
{{- range .Values.zones -}}
{{- $out = append $out (dict "name" (printf "%s-%s" $fullname . | trunc 63 | trimSuffix "-") "zone" .) -}}
{{- end -}}
{{- else -}}
{{- $out = append $out (dict "name" $fullname "zone" "") -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* A setting's value as the broker reads it: whole numbers without an exponent
     (values files parse every number as a float). */}}
{{- define "strata.settingValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- printf "%d" (int64 .) -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* STRATA_* variable of a setting named as in the README (dots and dashes become
     underscores). */}}
{{- define "strata.settingEnv" -}}
{{- printf "STRATA_%s" (. | upper | replace "." "_" | replace "-" "_") -}}
{{- end -}}
