{{- define "lbctl.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "lbctl.labels" -}}
app.kubernetes.io/part-of: lbctl
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "lbctl.class" -}}
{{ .Values.loadBalancerClass | default (printf "lbctl.io/%s" .Values.provider) }}
{{- end -}}

{{- define "lbctl.checks" -}}
{{- if ne .Release.Namespace "lbctl-system" -}}
{{- fail "install lbctl into the namespace lbctl-system (helm install ... -n lbctl-system --create-namespace): the forwarders' Leases and `lbctl status`/`lbctl doctor` live there" -}}
{{- end -}}
{{- if not (has .Values.provider (list "local" "aws" "gce")) -}}
{{- fail (printf "provider must be local, aws or gce, not %q" .Values.provider) -}}
{{- end -}}
{{- if and (eq .Values.provider "aws") (not .Values.aws.region) -}}
{{- fail "the aws provider needs aws.region" -}}
{{- end -}}
{{- if and (eq .Values.provider "gce") (not (and .Values.gce.project .Values.gce.region)) -}}
{{- fail "the gce provider needs gce.project and gce.region" -}}
{{- end -}}
{{- if and (gt (int .Values.operator.replicas) 1) (ne (toString .Values.operator.leaderElect) "true") -}}
{{- fail (printf "operator.replicas is %v but operator.leaderElect is not true: every replica would act on every Service and cloud at once. Set operator.leaderElect=true (one leader, warm standbys) or operator.replicas=1" .Values.operator.replicas) -}}
{{- end -}}
{{- if not (has .Values.forwarder.mode (list "full" "announce")) -}}
{{- fail (printf "forwarder.mode must be full or announce, not %q" .Values.forwarder.mode) -}}
{{- end -}}
{{- end -}}

{{- define "lbctl.providerOptions" -}}
{{- $pairs := list -}}
{{- range $key, $value := . -}}
{{- $pairs = append $pairs (printf "%s=%v" $key $value) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
