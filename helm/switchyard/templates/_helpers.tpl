{{/*
Names, labels and small shared fragments. Component helpers take a dict:
  ctx:       the root context ($)
  component: gateway | router-shard | persistor
*/}}

{{- define "switchyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified release name, at most 46 characters so that "<fullname>-router-shard" and the suffixes Kubernetes
adds to pod names stay within 63.
*/}}
{{- define "switchyard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "switchyard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "switchyard.labels" -}}
helm.sh/chart: {{ include "switchyard.chart" . }}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: switchyard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "switchyard.componentSelectorLabels" -}}
{{ include "switchyard.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "switchyard.componentLabels" -}}
{{ include "switchyard.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* "<fullname>-<component>", the name of the component's workload, Service, ConfigMap and so on. */}}
{{- define "switchyard.componentName" -}}
{{- printf "%s-%s" (include "switchyard.fullname" .ctx) .component }}
{{- end }}

{{/* The values block of a component. */}}
{{- define "switchyard.componentValues" -}}
{{- $key := get (dict "gateway" "gateway" "router-shard" "routerShard" "persistor" "persistor") .component }}
{{- toYaml (index .ctx.Values $key) }}
{{- end }}

{{- define "switchyard.serviceAccountName" -}}
{{- $v := include "switchyard.componentValues" . | fromYaml }}
{{- if $v.serviceAccount.create }}
{{- default (include "switchyard.componentName" .) $v.serviceAccount.name }}
{{- else }}
{{- default "default" $v.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "switchyard.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Name of the in-chart NATS, as the official chart computes it. */}}
{{- define "switchyard.natsFullname" -}}
{{- if .Values.nats.fullnameOverride }}
{{- .Values.nats.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "nats" .Values.nats.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "switchyard.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s.%s.svc:4222" (include "switchyard.natsFullname" .) .Release.Namespace }}
{{- else }}
{{- required "externalNats.url is required when nats.enabled is false" .Values.externalNats.url }}
{{- end }}
{{- end }}

{{- define "switchyard.natsMonitoringEndpoint" -}}
{{- if .Values.persistor.keda.natsServerMonitoringEndpoint }}
{{- .Values.persistor.keda.natsServerMonitoringEndpoint }}
{{- else if .Values.nats.enabled }}
{{- printf "%s-headless.%s.svc.cluster.local:8222" (include "switchyard.natsFullname" .) .Release.Namespace }}
{{- else }}
{{- required "persistor.keda needs persistor.keda.natsServerMonitoringEndpoint or externalNats.monitoringEndpoint (the NATS monitoring port, 8222)" .Values.externalNats.monitoringEndpoint }}
{{- end }}
{{- end }}

{{/* SWITCHYARD_STORE */}}
{{- define "switchyard.store" -}}
{{- if eq .Values.store.type "cql" }}
{{- printf "cql:%s" (join "," .Values.store.cql.hosts) }}
{{- else }}
{{- printf "embedded:%s" .Values.store.embedded.path }}
{{- end }}
{{- end }}

{{- define "switchyard.secretName" -}}
{{- include "switchyard.fullname" . }}
{{- end }}

{{- define "switchyard.adminTokenSecretName" -}}
{{- default (include "switchyard.secretName" .) .Values.gateway.adminToken.existingSecret }}
{{- end }}

{{- define "switchyard.adminTokenSecretKey" -}}
{{- if .Values.gateway.adminToken.existingSecret }}{{ .Values.gateway.adminToken.existingSecretKey }}{{ else }}admin-token{{ end }}
{{- end }}

{{- define "switchyard.redisSecretName" -}}
{{- default (include "switchyard.secretName" .) .Values.externalRedis.existingSecret }}
{{- end }}

{{- define "switchyard.redisSecretKey" -}}
{{- if .Values.externalRedis.existingSecret }}{{ .Values.externalRedis.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}

{{/*
A flat map of settings as TOML. Helm reads YAML numbers as floats (toToml would write 25000.0, which the services'
integer fields reject), so whole numbers are written as integers.
*/}}
{{- define "switchyard.toml" -}}
{{- range $k, $v := . }}
{{- if kindIs "float64" $v }}
{{- if eq $v (floor $v) }}
{{ $k }} = {{ int64 $v }}
{{- else }}
{{ $k }} = {{ $v }}
{{- end }}
{{- else if or (kindIs "string" $v) (kindIs "slice" $v) }}
{{ $k }} = {{ toJson $v }}
{{- else }}
{{ $k }} = {{ $v }}
{{- end }}
{{- end }}
{{- end }}

{{/* The affinity of a component: its own value when set, else pod anti-affinity from its podAntiAffinity. */}}
{{- define "switchyard.affinity" -}}
{{- $v := include "switchyard.componentValues" . | fromYaml }}
{{- if $v.affinity }}
affinity:
  {{- toYaml $v.affinity | nindent 2 }}
{{- else if eq $v.podAntiAffinity "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: {{ $v.podAntiAffinityTopologyKey }}
          labelSelector:
            matchLabels:
              {{- include "switchyard.componentSelectorLabels" . | nindent 14 }}
{{- else if eq $v.podAntiAffinity "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: {{ $v.podAntiAffinityTopologyKey }}
        labelSelector:
          matchLabels:
            {{- include "switchyard.componentSelectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}

{{/* Pod-level fields every component shares (inside a pod spec). */}}
{{- define "switchyard.podCommon" -}}
{{- $v := include "switchyard.componentValues" . | fromYaml -}}
serviceAccountName: {{ include "switchyard.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "switchyard.affinity" . }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod template annotations: config checksums (so a config change rolls the pods) and scrape hints. */}}
{{- define "switchyard.podAnnotations" -}}
{{- $v := include "switchyard.componentValues" . | fromYaml -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
checksum/secret: {{ include "switchyard.secretInputs" .ctx | sha256sum }}
{{- if .ctx.Values.metrics.podAnnotations }}
{{- if eq .component "gateway" }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ $v.port | quote }}
prometheus.io/path: /metrics
{{- else if $v.metrics.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ $v.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}
{{- with $v.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* A PodDisruptionBudget for a component whose pdb.enabled is true. */}}
{{- define "switchyard.pdb" -}}
{{- $v := include "switchyard.componentValues" . | fromYaml }}
{{- if $v.pdb.enabled }}
{{- if and (ne (toString $v.pdb.maxUnavailable) "") (ne (toString $v.pdb.minAvailable) "") }}
{{- fail (printf "%s.pdb: set only one of maxUnavailable and minAvailable" .component) }}
{{- end }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "switchyard.componentName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "switchyard.componentLabels" . | nindent 4 }}
spec:
  {{- if ne (toString $v.pdb.minAvailable) "" }}
  minAvailable: {{ $v.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $v.pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "switchyard.componentSelectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/*
What the chart's Secret is made from, for the pods' checksum annotation. A generated admin token is left out: it
is random on every render without a cluster (helm template) and kept by lookup on upgrades, so hashing it would
restart pods for nothing.
*/}}
{{- define "switchyard.secretInputs" -}}
{{ .Values.gateway.adminToken.value }}/{{ .Values.gateway.adminToken.existingSecret }}/{{ .Values.gateway.adminToken.existingSecretKey }}
{{ .Values.externalRedis.url }}/{{ .Values.externalRedis.existingSecret }}/{{ .Values.externalRedis.existingSecretKey }}
{{- end }}

{{/*
Backend credentials and TLS of a component (dict ctx component): NATS for every component, Redis for the gateway,
CQL for the persistor on the CQL store. Credentials come from existing Secrets through secretKeyRef, so no secret
passes through the chart's values or its ConfigMaps. TLS and creds Secrets are mounted read-only under
/var/run/secrets/switchyard/<volume> (not under /etc/switchyard, where the config volume's files are swapped on a
ConfigMap change), each key renamed to a fixed file name that the *_FILE variable names: the file paths never
depend on how a Secret names its keys.
*/}}
{{- define "switchyard.secretDir" -}}
/var/run/secrets/switchyard
{{- end }}

{{/* One env entry from an existing Secret (dict name ref), when ref.existingSecret is set. */}}
{{- define "switchyard.secretEnv" -}}
{{- if .ref.existingSecret }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .ref.existingSecret }}
      key: {{ .ref.existingSecretKey }}
{{- end }}
{{- end }}

{{/* The TLS file variables of a backend (dict prefix tls volume ctx), when its TLS Secret is mounted. */}}
{{- define "switchyard.tlsEnv" -}}
{{- if and .tls.enabled .tls.existingSecret }}
{{- $dir := printf "%s/%s" (include "switchyard.secretDir" .ctx) .volume }}
{{- if .tls.caKey }}
- name: SWITCHYARD_{{ .prefix }}_TLS_CA_FILE
  value: {{ $dir }}/ca.crt
{{- end }}
{{- if .tls.certKey }}
- name: SWITCHYARD_{{ .prefix }}_TLS_CERT_FILE
  value: {{ $dir }}/tls.crt
{{- end }}
{{- if .tls.keyKey }}
- name: SWITCHYARD_{{ .prefix }}_TLS_KEY_FILE
  value: {{ $dir }}/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* The secret volume of a backend's TLS files (dict tls volume), when enabled and named. */}}
{{- define "switchyard.tlsVolume" -}}
{{- if and .tls.enabled .tls.existingSecret }}
- name: {{ .volume }}
  secret:
    secretName: {{ .tls.existingSecret }}
    items:
      {{- if .tls.caKey }}
      - key: {{ .tls.caKey }}
        path: ca.crt
      {{- end }}
      {{- if .tls.certKey }}
      - key: {{ .tls.certKey }}
        path: tls.crt
      {{- end }}
      {{- if .tls.keyKey }}
      - key: {{ .tls.keyKey }}
        path: tls.key
      {{- end }}
{{- end }}
{{- end }}

{{/* Which backends a component talks to: "nats", plus "redis" (gateway) or "cql" (persistor on the CQL store). */}}
{{- define "switchyard.backendsOf" -}}
nats
{{- if eq .component "gateway" }} redis{{ end }}
{{- if and (eq .component "persistor") (eq .ctx.Values.store.type "cql") }} cql{{ end }}
{{- end }}

{{/* The env entries of a component's backend credentials and TLS settings (list items, no leading newline). */}}
{{- define "switchyard.backendEnv" -}}
{{- $ctx := .ctx }}
{{- $backends := include "switchyard.backendsOf" . | splitList " " }}
{{- $n := $ctx.Values.natsClient }}
{{- with $n.user }}
- name: SWITCHYARD_NATS_USER
  value: {{ . | quote }}
{{- end }}
{{- include "switchyard.secretEnv" (dict "name" "SWITCHYARD_NATS_PASSWORD" "ref" $n.password) }}
{{- include "switchyard.secretEnv" (dict "name" "SWITCHYARD_NATS_TOKEN" "ref" $n.token) }}
{{- include "switchyard.secretEnv" (dict "name" "SWITCHYARD_NATS_NKEY_SEED" "ref" $n.nkeySeed) }}
{{- if $n.credsFile.existingSecret }}
- name: SWITCHYARD_NATS_CREDS_FILE
  value: {{ include "switchyard.secretDir" $ctx }}/nats-creds/nats.creds
{{- end }}
{{- if $n.tls.enabled }}
- name: SWITCHYARD_NATS_TLS_REQUIRED
  value: "true"
{{- end }}
{{- include "switchyard.tlsEnv" (dict "prefix" "NATS" "tls" $n.tls "volume" "nats-tls" "ctx" $ctx) }}
{{- if has "redis" $backends }}
{{- $r := $ctx.Values.externalRedis }}
{{- with $r.username }}
- name: SWITCHYARD_REDIS_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- include "switchyard.secretEnv" (dict "name" "SWITCHYARD_REDIS_PASSWORD" "ref" $r.password) }}
{{- include "switchyard.tlsEnv" (dict "prefix" "REDIS" "tls" $r.tls "volume" "redis-tls" "ctx" $ctx) }}
{{- end }}
{{- if has "cql" $backends }}
{{- $q := $ctx.Values.store.cql }}
{{- with $q.username }}
- name: SWITCHYARD_CQL_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- include "switchyard.secretEnv" (dict "name" "SWITCHYARD_CQL_PASSWORD" "ref" $q.password) }}
{{- if $q.tls.enabled }}
- name: SWITCHYARD_CQL_TLS
  value: "true"
{{- end }}
{{- include "switchyard.tlsEnv" (dict "prefix" "CQL" "tls" $q.tls "volume" "cql-tls" "ctx" $ctx) }}
{{- end }}
{{- end }}

{{/* The volumes behind a component's backend files (list items). */}}
{{- define "switchyard.backendVolumes" -}}
{{- $ctx := .ctx }}
{{- $backends := include "switchyard.backendsOf" . | splitList " " }}
{{- $n := $ctx.Values.natsClient }}
{{- if $n.credsFile.existingSecret }}
- name: nats-creds
  secret:
    secretName: {{ $n.credsFile.existingSecret }}
    items:
      - key: {{ $n.credsFile.existingSecretKey }}
        path: nats.creds
{{- end }}
{{- include "switchyard.tlsVolume" (dict "tls" $n.tls "volume" "nats-tls") }}
{{- if has "redis" $backends }}
{{- include "switchyard.tlsVolume" (dict "tls" $ctx.Values.externalRedis.tls "volume" "redis-tls") }}
{{- end }}
{{- if has "cql" $backends }}
{{- include "switchyard.tlsVolume" (dict "tls" $ctx.Values.store.cql.tls "volume" "cql-tls") }}
{{- end }}
{{- end }}

{{/* A read-only mount for each volume of switchyard.backendVolumes (list items). */}}
{{- define "switchyard.backendMounts" -}}
{{- $dir := include "switchyard.secretDir" .ctx }}
{{- range (include "switchyard.backendVolumes" . | fromYamlArray) }}
- name: {{ .name }}
  mountPath: {{ $dir }}/{{ .name }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Value sets whose backend settings cannot work: the services would refuse them at start (two ways to authenticate
to NATS, a user without a password, a certificate without its key, TLS files for a redis:// URL), or a TLS Secret
from which no file is taken.
*/}}
{{- define "switchyard.checkBackends" -}}
{{- $n := .Values.natsClient }}
{{- $ways := 0 }}
{{- if or $n.user $n.password.existingSecret }}{{ $ways = add1 $ways }}{{ end }}
{{- if $n.token.existingSecret }}{{ $ways = add1 $ways }}{{ end }}
{{- if $n.nkeySeed.existingSecret }}{{ $ways = add1 $ways }}{{ end }}
{{- if $n.credsFile.existingSecret }}{{ $ways = add1 $ways }}{{ end }}
{{- if gt $ways 1 }}
{{- fail "natsClient: set one way to authenticate to NATS: user and password, token, nkeySeed or credsFile" }}
{{- end }}
{{- if ne (not $n.user) (not $n.password.existingSecret) }}
{{- fail "natsClient.user and natsClient.password.existingSecret go together" }}
{{- end }}
{{- $q := .Values.store.cql }}
{{- if and (eq .Values.store.type "cql") (ne (not $q.username) (not $q.password.existingSecret)) }}
{{- fail "store.cql.username and store.cql.password.existingSecret go together" }}
{{- end }}
{{- range $name, $tls := dict "natsClient.tls" $n.tls "externalRedis.tls" .Values.externalRedis.tls "store.cql.tls" $q.tls }}
{{- if and $tls.enabled $tls.existingSecret }}
{{- if ne (not $tls.certKey) (not $tls.keyKey) }}
{{- fail (printf "%s: certKey and keyKey go together (a client certificate needs its key)" $name) }}
{{- end }}
{{- if not (or $tls.caKey $tls.certKey) }}
{{- fail (printf "%s.existingSecret is set but caKey, certKey and keyKey are all empty" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- $r := .Values.externalRedis }}
{{- if and $r.tls.enabled $r.tls.existingSecret (not $r.existingSecret) (not (hasPrefix "rediss://" $r.url)) }}
{{- fail "externalRedis.tls files need a rediss:// externalRedis.url (the gateway refuses them with redis://)" }}
{{- end }}
{{- end }}
